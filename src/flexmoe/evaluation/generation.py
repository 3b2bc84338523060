"""Batched greedy generation with the KV cache, for evaluating instruction following.

Prompts are left-padded so every row's continuation starts at the same position; decoding is
greedy (the paper's setting), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from flexmoe.data.prompting import encode_prompt
from flexmoe.data.records import InstructionRecord


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[InstructionRecord],
    *,
    max_new_tokens: int,
    max_prompt_length: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy-decode a response for each record's Alpaca prompt; returns the decoded texts."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    outputs: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = [
            encode_prompt(r, tokenizer, max_prompt_length)
            for r in records[start : start + batch_size]
        ]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, width:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return [text.strip() for text in outputs]

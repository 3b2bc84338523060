"""The paper's Alpaca prompt template, and records -> token ids with the loss on the response only.

Prompt and response are tokenized separately, so the boundary between the masked prompt and the
labelled response is exact (tokenizing the concatenation can merge tokens across it). The
tokenizer adds no special tokens itself: we prepend its BOS token when it would add one on its own
(Llama-style tokenizers do, Qwen's do not) and append EOS to a complete response.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from flexmoe.data.records import DataError, DataWarning, InstructionRecord

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt and padding); torch's cross-entropy default."""


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + response (+ EOS), and labels: IGNORE_INDEX on the prompt, ids after."""

    input_ids: list[int]
    labels: list[int]


def build_prompt(record: InstructionRecord) -> str:
    """The Alpaca prompt for `record`, with the Input section only when it has a context."""
    return _render(record.instruction, record.context)


def encode_example(
    record: InstructionRecord, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> EncodedExample | None:
    """Tokenize `record` for training in at most `max_length` tokens, or None to skip it.

    Truncation, when prompt + response + EOS is longer than `max_length`:
    1. The context is cut: its longest head (re-rendered in the template) with which the whole
       response and EOS still fit. If no context token fits, the instruction-only template is used.
    2. If the response does not fit even after the instruction-only prompt, it is cut instead: the
       prompt gets at most `max_length - max_length // 2` tokens (the context cut as in 1), the
       response's head fills the rest, so at least `max_length // 2` response tokens remain when
       the instruction allows it. No EOS: the response is incomplete.
    3. If, in case 2, the instruction-only prompt leaves fewer than `max_length // 4` tokens for
       the response, the example is skipped (None); `encode_dataset` counts and reports these.
    """
    return _encode(record, tokenizer, max_length, _bos_ids(tokenizer), _eos_id(tokenizer))


def encode_prompt(
    record: InstructionRecord, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int
) -> list[int]:
    """Token ids of the prompt for generation, in at most `max_prompt_length` tokens.

    The context is cut as in `encode_example`; if even the instruction-only prompt is too long,
    the instruction keeps its head instead, so that the prompt always ends with "### Response:".
    """
    bos = _bos_ids(tokenizer)
    prompt = _PromptTokens(record, tokenizer, bos)
    ids = prompt.within(max_prompt_length) or _fit_head(
        _tokens(tokenizer, record.instruction),
        len(prompt.instruction_only),
        lambda head: _render(head, ""),
        tokenizer,
        max_prompt_length,
        bos,
    )
    if ids is None:
        bare = len(bos) + len(_tokens(tokenizer, _render("", "")))
        raise DataError(
            f"max_prompt_length={max_prompt_length} leaves no room for the instruction: the bare "
            f"prompt template alone takes {bare} tokens; raise it"
        )
    return ids


def encode_dataset(
    records: Sequence[InstructionRecord], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[EncodedExample]:
    """`encode_example` over `records`, dropping skipped ones with one warning giving the count."""
    bos, eos = _bos_ids(tokenizer), _eos_id(tokenizer)
    encoded = [_encode(record, tokenizer, max_length, bos, eos) for record in records]
    examples = [example for example in encoded if example is not None]
    skipped = len(encoded) - len(examples)
    if skipped:
        warnings.warn(
            f"skipped {skipped} of {len(encoded)} examples whose instruction leaves fewer than "
            f"max_length // 4 = {max_length // 4} tokens for a response that does not fit "
            f"max_length={max_length}; raise max_length to keep them",
            DataWarning,
            stacklevel=2,
        )
    return examples


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask (1 on tokens), labels (IGNORE_INDEX on pads)."""
    if not examples:
        raise DataError("collate got an empty batch")
    if pad_token_id is None:
        raise DataError(
            "pad_token_id is None: give the tokenizer a pad token (often its EOS token)"
        )
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _render(instruction: str, context: str) -> str:
    if context:
        return PROMPT_WITH_CONTEXT.format(instruction=instruction, context=context)
    return PROMPT_NO_CONTEXT.format(instruction=instruction)


def _encode(
    record: InstructionRecord,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    bos: list[int],
    eos: int,
) -> EncodedExample | None:
    if max_length < 1:
        raise DataError(f"max_length must be a positive number of tokens, got {max_length}")
    response = _tokens(tokenizer, record.response)
    prompt = _PromptTokens(record, tokenizer, bos)
    ids = prompt.within(max_length - len(response) - 1)
    if ids is not None:
        return EncodedExample(ids + response + [eos], [IGNORE_INDEX] * len(ids) + response + [eos])
    ids = prompt.within(max_length - max_length // 2)
    if ids is None:
        ids = prompt.instruction_only
        if max_length - len(ids) < max_length // 4:
            return None
    response = response[: max_length - len(ids)]
    return EncodedExample(ids + response, [IGNORE_INDEX] * len(ids) + response)


class _PromptTokens:
    """One record's prompt under token budgets; each variant is tokenized at most once."""

    def __init__(
        self, record: InstructionRecord, tokenizer: PreTrainedTokenizerBase, bos: list[int]
    ) -> None:
        self.record, self.tokenizer, self.bos = record, tokenizer, bos

    @cached_property
    def full(self) -> list[int]:
        return self.bos + _tokens(self.tokenizer, build_prompt(self.record))

    @cached_property
    def instruction_only(self) -> list[int]:
        if not self.record.context:
            return self.full
        return self.bos + _tokens(self.tokenizer, _render(self.record.instruction, ""))

    @cached_property
    def context_ids(self) -> list[int]:
        return _tokens(self.tokenizer, self.record.context)

    def within(self, budget: int) -> list[int] | None:
        """The full prompt if it fits `budget`, else with the context's longest head that fits,
        else the instruction-only prompt; None if even that is too long."""
        if len(self.full) <= budget:
            return self.full
        instruction = self.record.instruction
        cut = _fit_head(
            self.context_ids,
            len(self.full),
            lambda head: _render(instruction, head),
            self.tokenizer,
            budget,
            self.bos,
        )
        if cut is not None:
            return cut
        return self.instruction_only if len(self.instruction_only) <= budget else None


def _fit_head(
    text_ids: list[int],
    rendered_length: int,
    render: Callable[[str], str],
    tokenizer: PreTrainedTokenizerBase,
    budget: int,
    bos: list[int],
) -> list[int] | None:
    """BOS + render(longest non-empty head of a text) in at most `budget` tokens, else None.

    `text_ids` are the text's tokens and `rendered_length` the length of BOS + render(whole text).
    The head first drops the overshoot; re-rendering can merge tokens differently at the cut, so
    it shrinks again by any remaining overshoot until it fits.
    """
    keep = len(text_ids) - (rendered_length - budget)
    while keep > 0:
        # A byte-level cut can split a multi-byte character: drop the "\ufffd" it decodes to.
        head = tokenizer.decode(text_ids[:keep]).rstrip("\ufffd")
        ids = bos + _tokens(tokenizer, render(head))
        if head and len(ids) <= budget:
            return ids
        keep -= max(len(ids) - budget, 1)
    return None


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] if the tokenizer adds a BOS token on its own (probed on a one-letter text), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer.encode("a", add_special_tokens=True)[:1] == [bos] else []


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no eos_token: set one (tokenizer.eos_token = ...) so that the model "
            "learns where a response ends"
        )
    return tokenizer.eos_token_id

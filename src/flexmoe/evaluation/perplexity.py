"""Held-out perplexity and bits per byte on WikiText-2 test, a text flexmoe never trains on.

The slice is fixed (the articles in order, joined by EOS, the first `max_tokens` tokens), so the
same model and tokenizer always give the same numbers. The tokens are cut into consecutive,
non-overlapping windows of `seq_len` tokens; every token after the first is predicted exactly
once, from the tokens before it in its window. Bits per byte divide the summed loss (in bits) by
the UTF-8 bytes of the predicted text, so models with different tokenizers compare fairly;
perplexity is per token and only compares models sharing a tokenizer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from rich.progress import track
from transformers import PreTrainedTokenizerBase

from flexmoe.data import corpus_documents
from flexmoe.runtime import console

DEFAULT_MAX_TOKENS = 65_536
"""WikiText-2 test holds about 400k tokens of the built-in tokenizer; 65k give a stable number."""


class PerplexityError(ValueError):
    """A perplexity evaluation that cannot run as asked; the message says what to change."""


@torch.no_grad()
def heldout_perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """{"perplexity", "bits_per_byte", "tokens"} of `model` on the held-out slice.

    `seq_len` defaults to the model's maximum position count, at most 1024. `tokens` is the number
    of predicted tokens (fewer than `max_tokens` only if the held-out text is shorter).
    """
    if max_tokens < 1 or batch_size < 1:
        raise PerplexityError(
            f"max_tokens and batch_size must be >= 1, got {max_tokens}, {batch_size}"
        )
    trained_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    length = seq_len or min(trained_length or 1024, 1024)
    if length < 1:
        raise PerplexityError(f"seq_len must be >= 1, got {seq_len}")
    ids = heldout_token_ids(tokenizer, max_tokens)
    windows = [ids[start : start + length + 1] for start in range(0, len(ids) - 1, length)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    try:
        for first in track(
            range(0, len(windows), batch_size),
            description="held-out perplexity",
            console=console,
            disable=not progress,
            transient=True,
        ):
            for group in _by_length(windows[first : first + batch_size]):
                chunk = torch.tensor(group, dtype=torch.long, device=device)
                logits = model(input_ids=chunk[:, :-1]).logits.float()
                targets = chunk[:, 1:]
                total_nll += F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
                ).item()
                total_tokens += targets.numel()
    finally:
        model.train(was_training)
    scored_bytes = len(tokenizer.decode(ids[1:], skip_special_tokens=True).encode("utf-8"))
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "bits_per_byte": total_nll / math.log(2) / scored_bytes,
        "tokens": total_tokens,
    }


def heldout_token_ids(tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[int]:
    """The first `max_tokens` + 1 tokens of the held-out articles, each followed by EOS."""
    ids: list[int] = []
    for article in corpus_documents("heldout"):
        if len(ids) > max_tokens:
            break
        ids += tokenizer.encode(article, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if len(ids) < 2:
        raise PerplexityError("the tokenizer produced fewer than 2 held-out tokens")
    return ids[: max_tokens + 1]


def _by_length(windows: list[list[int]]) -> list[list[list[int]]]:
    """Group windows of equal length so each group stacks into one tensor (only the last differs)."""
    groups: dict[int, list[list[int]]] = {}
    for window in windows:
        groups.setdefault(len(window), []).append(window)
    return list(groups.values())

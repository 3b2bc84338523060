"""Held-out perplexity: equals the model's own loss on the same windows, is deterministic and
does not depend on batching."""

import math

import pytest
import torch
from tiny_models import build_tiny

from flexmoe.data import corpus_documents
from flexmoe.evaluation.perplexity import PerplexityError, heldout_perplexity, heldout_token_ids
from flexmoe.models.tokenizer import train_tokenizer

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_documents("heldout")[:3], VOCAB)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny("qwen3_moe", seed=0, vocab_size=len(tokenizer))


def test_perplexity_is_the_models_own_loss_on_non_overlapping_windows(model, tokenizer):
    result = heldout_perplexity(
        model, tokenizer, max_tokens=200, seq_len=64, batch_size=2, progress=False
    )
    ids = torch.tensor(heldout_token_ids(tokenizer, 200))
    assert len(ids) == 201 and result["tokens"] == 200
    total = 0.0
    with torch.no_grad():
        for start in range(0, 200, 64):  # windows of 65 ids predict 64 tokens; the last 8
            window = ids[start : start + 65][None]
            loss = model(input_ids=window, labels=window).loss  # mean over window length - 1
            total += loss.item() * (window.shape[1] - 1)
    assert result["perplexity"] == pytest.approx(math.exp(total / 200), rel=1e-5)
    text_bytes = len(tokenizer.decode(ids[1:].tolist()).encode("utf-8"))
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / text_bytes, rel=1e-5)


def test_deterministic_and_independent_of_batch_size(model, tokenizer):
    one = heldout_perplexity(
        model, tokenizer, max_tokens=300, seq_len=32, batch_size=1, progress=False
    )
    many = heldout_perplexity(
        model, tokenizer, max_tokens=300, seq_len=32, batch_size=8, progress=False
    )
    again = heldout_perplexity(
        model, tokenizer, max_tokens=300, seq_len=32, batch_size=8, progress=False
    )
    assert many == again
    assert one["perplexity"] == pytest.approx(many["perplexity"], rel=1e-5)
    assert one["tokens"] == many["tokens"] == 300


def test_bad_arguments_are_refused(model, tokenizer):
    with pytest.raises(PerplexityError, match="max_tokens"):
        heldout_perplexity(model, tokenizer, max_tokens=0, progress=False)

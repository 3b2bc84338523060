"""A client's local-training helpers: seeded batches, the round learning-rate schedule."""

import pytest

from flexmoe.data.prompting import EncodedExample
from flexmoe.federated.local_training import cosine_lr, draw_batches, round_seed


def examples(n: int) -> list[EncodedExample]:
    return [EncodedExample(input_ids=[i + 3, 4], labels=[-100, 4]) for i in range(n)]


def test_batches_are_seeded_and_cover_an_epoch_before_repeating():
    first = draw_batches(examples(5), steps=3, batch_size=2, seed=7, pad_token_id=0)
    again = draw_batches(examples(5), steps=3, batch_size=2, seed=7, pad_token_id=0)
    other = draw_batches(examples(5), steps=3, batch_size=2, seed=8, pad_token_id=0)
    assert [b["input_ids"].tolist() for b in first] == [b["input_ids"].tolist() for b in again]
    assert [b["input_ids"].tolist() for b in first] != [b["input_ids"].tolist() for b in other]
    drawn = [int(ids[0]) for batch in first for ids in batch["input_ids"]]
    assert sorted(drawn[:5]) == [3, 4, 5, 6, 7]  # the first 5 draws are one pass over the data


def test_a_client_without_examples_gets_a_clear_error():
    with pytest.raises(ValueError, match="no training examples"):
        draw_batches([], steps=1, batch_size=2, seed=0, pad_token_id=0)


def test_round_seeds_and_learning_rate_schedule():
    seeds = {round_seed(0, r, c) for r in (1, 2) for c in (0, 1)}
    assert len(seeds) == 4 and round_seed(0, 1, 0) == round_seed(0, 1, 0)
    assert cosine_lr(1, 10, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert cosine_lr(10, 10, 1e-3, 1e-5) == pytest.approx(1e-5)
    assert cosine_lr(1, 1, 1e-3, 1e-5) == pytest.approx(1e-3)

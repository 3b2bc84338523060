"""Multi-seed summaries and paired tests, checked against numbers worked out by hand."""

import math

import numpy as np
import pytest

from flexmoe.evaluation import stats
from flexmoe.evaluation.stats import (
    StatsError,
    compare_to_baselines,
    mean_std,
    paired_comparison,
    seed_summary,
    sign_flip_p_value,
)


def test_mean_and_sample_std_over_seeds():
    summary = seed_summary({"flex": {"rougeL": [1.0, 2.0, 3.0, 4.0], "mmlu": [50.0]}})
    rouge = summary["flex"]["rougeL"]
    assert rouge.mean == 2.5 and rouge.n == 4
    assert rouge.std == pytest.approx(math.sqrt(5 / 3))  # squared deviations 2.25+.25+.25+2.25 / 3
    assert summary["flex"]["mmlu"].std is None  # one seed: no spread, not a spread of zero
    assert str(rouge) == "2.50 ± 1.29 (n=4)"
    with pytest.raises(StatsError, match="at least one seed"):
        mean_std([])


def test_exact_permutation_p_value_by_hand():
    # Sums of ±1 ±2 ±3 ±4 over the 16 sign assignments: ±10, ±8, ±6, ±4 (x2), ±2 (x2), 0 (x2).
    # The observed sum is 1 - 2 + 3 + 4 = 6; |sum| >= 6 for 10, 8, 6 and their negatives: 6/16.
    assert sign_flip_p_value(np.array([1.0, -2.0, 3.0, 4.0])) == 6 / 16
    # ±1 ±2 ±3 gives 6, 4, 2, 0, 0, -2, -4, -6: only ±6 reach 6.
    assert sign_flip_p_value(np.array([1.0, 2.0, 3.0])) == 2 / 8
    assert sign_flip_p_value(np.array([])) == 1.0


def test_paired_comparison_by_hand():
    pairs = [(seed, client) for seed in range(2) for client in range(3)]
    baseline = dict.fromkeys(pairs, 40.0)
    # differences -1, 2, 3, 4, 5, 6: all ranks positive except rank 1, so W- = 1;
    # P(W- <= 1) = 2/64 (only W- = 0 and W- = 1 assignments), two-sided 4/64 = 0.0625.
    flex = {pair: 40.0 + d for pair, d in zip(pairs, [-1, 2, 3, 4, 5, 6], strict=True)}
    result = paired_comparison(flex, baseline)
    assert result.n == 6
    assert result.mean_difference == pytest.approx(19 / 6)
    assert result.wilcoxon_p == pytest.approx(4 / 64)
    # Permutation test: the observed sum 19 is beaten only when -1 keeps its sign or all flip:
    # |sum| >= 19 for the sums 19 and 21 and their negatives: 4 of 64.
    assert result.permutation_p == pytest.approx(4 / 64)
    assert result.note == "" and "exact" in result.test


def test_wilcoxon_uses_average_ranks_and_drops_zeros():
    pairs = range(5)
    # differences 0, 1, 1, -2, 3: the zero is dropped, ranks of |1|, |1| are 1.5 each:
    # signed ranks 1.5, 1.5, -3, 4; the observed sum 4 is reached by flips giving |sum| >= 4.
    flex = dict(zip(pairs, [0.0, 1.0, 1.0, -2.0, 3.0], strict=True))
    result = paired_comparison(flex, dict.fromkeys(pairs, 0.0))
    assert result.wilcoxon_p == sign_flip_p_value(np.array([1.5, 1.5, -3.0, 4.0]))
    assert "too few pairs" in result.note and "0.0625" in result.note


def test_identical_methods_give_p_one():
    scores = {"flex": dict.fromkeys(range(8), 1.0), "fedavg": dict.fromkeys(range(8), 1.0)}
    result = compare_to_baselines(scores)["fedavg"]
    assert result.mean_difference == 0 and result.permutation_p == 1 and result.wilcoxon_p == 1


def test_monte_carlo_beyond_the_exact_limit_is_seeded_and_close(monkeypatch):
    differences = np.random.default_rng(1).normal(0.3, 1.0, size=12)
    exact = sign_flip_p_value(differences)
    monkeypatch.setattr(stats, "EXACT_MAX_PAIRS", 4)  # force sampling on these 12 values
    pairs = range(len(differences))
    flex = dict(zip(pairs, differences, strict=True))
    first = paired_comparison(flex, dict.fromkeys(pairs, 0.0), seed=3)
    assert first == paired_comparison(flex, dict.fromkeys(pairs, 0.0), seed=3)
    assert "Monte Carlo" in first.test
    assert first.permutation_p == pytest.approx(exact, abs=0.01)  # 200k draws: sd < 0.002


def test_mismatched_pairs_are_refused_not_dropped():
    with pytest.raises(StatsError, match="1 only in the method"):
        paired_comparison({(0, 0): 1.0, (0, 1): 2.0}, {(0, 0): 1.0})

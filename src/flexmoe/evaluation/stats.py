"""Statistics over repeated runs: mean ± spread across seeds, and paired tests of FLEx vs baselines.

The paper reports single runs. Here every metric is summarised over seeds (mean and sample
standard deviation), and FLEx is compared with each baseline on the same (seed, client) pairs:
both methods saw the same partition and the same test items there, so the per-pair differences
remove most of the between-client variation.

The tests need nothing beyond NumPy. Both are sign-flip permutation tests: under the null
hypothesis (no difference between the methods) each pair's difference is as likely to have
either sign, so the p-value is the share of the 2^n sign assignments whose statistic is at least
as extreme as the observed one. On the differences themselves this is the paired permutation
test (Fisher); on their signed ranks it is the exact Wilcoxon signed-rank test (ties get average
ranks, zero differences are dropped). Both are exact up to `EXACT_MAX_PAIRS` pairs, beyond which
a seeded Monte Carlo sample of sign assignments is used. With n pairs no two-sided p-value can be
below 2 / 2^n (0.0625 for 5 pairs), hence the note on small n.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

EXACT_MAX_PAIRS = 20
"""Up to this many pairs every sign assignment is enumerated (2^20 ~ 1M); beyond, Monte Carlo."""
MONTE_CARLO_DRAWS = 200_000
MIN_RELIABLE_PAIRS = 6
"""Below this, the smallest attainable two-sided p-value (2 / 2^n) is above 0.03."""
_CHUNK = 1 << 15  # sign assignments evaluated at once (bounds memory to a few MB)


class StatsError(ValueError):
    """Inputs that cannot be summarised or compared; the message says what is missing."""


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof=1) of one metric over `n` seeds."""

    mean: float
    std: float | None
    """None for a single seed: the spread of one value is undefined, not zero."""
    n: int

    def __str__(self) -> str:
        spread = "n/a" if self.std is None else f"{self.std:.2f}"
        return f"{self.mean:.2f} ± {spread} (n={self.n})"


def mean_std(values: Sequence[float]) -> MeanStd:
    """Mean and sample standard deviation of per-seed values."""
    if len(values) == 0:
        raise StatsError("no values to summarise: every metric needs at least one seed")
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return MeanStd(float(array.mean()), std, len(array))


def seed_summary(
    values: Mapping[str, Mapping[str, Sequence[float]]],
) -> dict[str, dict[str, MeanStd]]:
    """method -> metric -> per-seed values  ==>  method -> metric -> mean ± std."""
    return {
        method: {metric: mean_std(seeds) for metric, seeds in metrics.items()}
        for method, metrics in values.items()
    }


@dataclass(frozen=True)
class PairedComparison:
    """FLEx against one baseline on matched (seed, client) pairs; differences are method - baseline."""

    n: int
    mean_difference: float
    std_difference: float | None
    permutation_p: float
    """Two-sided p-value of the paired permutation test on the mean difference."""
    wilcoxon_p: float
    """Two-sided p-value of the Wilcoxon signed-rank test (zero differences dropped)."""
    test: str
    """How the p-values were computed (exact enumeration or Monte Carlo)."""
    note: str
    """Empty, or a plain warning (e.g. too few pairs for a reliable test)."""

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(
    method: Mapping[Hashable, float],
    baseline: Mapping[Hashable, float],
    *,
    seed: int = 0,
) -> PairedComparison:
    """Compare two methods' scores keyed by the same pairs, e.g. {(seed, client): ROUGE-L}.

    Both mappings must cover exactly the same keys: a pair present for one method only would be
    silently dropped otherwise. `seed` drives the Monte Carlo sampling beyond `EXACT_MAX_PAIRS`.
    """
    only_method = [k for k in method if k not in baseline]
    only_baseline = [k for k in baseline if k not in method]
    if only_method or only_baseline:
        raise StatsError(
            f"the two methods were not evaluated on the same pairs: {len(only_method)} only in "
            f"the method (e.g. {only_method[:3]}), {len(only_baseline)} only in the baseline "
            f"(e.g. {only_baseline[:3]}); compare runs with the same seeds and clients"
        )
    if not method:
        raise StatsError("no pairs to compare")
    differences = np.array([method[k] - baseline[k] for k in method], dtype=float)
    n = len(differences)
    rng = np.random.default_rng(seed)
    nonzero = differences[differences != 0]
    ranks = _average_ranks(np.abs(nonzero)) * np.sign(nonzero)
    exact = n <= EXACT_MAX_PAIRS
    test = (
        "sign-flip tests, exact (all 2^n sign assignments)"
        if exact
        else f"sign-flip tests, Monte Carlo ({MONTE_CARLO_DRAWS:,} seeded sign assignments)"
    )
    note = ""
    if n < MIN_RELIABLE_PAIRS:
        note = (
            f"too few pairs for a reliable test (n={n}: the smallest attainable two-sided "
            f"p-value is {min(1.0, 2 / 2**n):.4g})"
        )
    return PairedComparison(
        n=n,
        mean_difference=float(differences.mean()),
        std_difference=float(differences.std(ddof=1)) if n > 1 else None,
        permutation_p=sign_flip_p_value(differences, rng),
        wilcoxon_p=sign_flip_p_value(ranks, rng),
        test=f"paired permutation test and Wilcoxon signed-rank test; {test}",
        note=note,
    )


def compare_to_baselines(
    scores: Mapping[str, Mapping[Hashable, float]],
    method: str = "flex",
    *,
    seed: int = 0,
) -> dict[str, PairedComparison]:
    """`method` against every other method in `scores` (method -> {(seed, client): value})."""
    if method not in scores:
        raise StatsError(f"method {method!r} not among the scores ({', '.join(scores)})")
    return {
        baseline: paired_comparison(scores[method], values, seed=seed)
        for baseline, values in scores.items()
        if baseline != method
    }


def sign_flip_p_value(values: np.ndarray, rng: np.random.Generator | None = None) -> float:
    """Two-sided p-value of |sum(values)| under random sign flips of the values.

    Exact (all 2^n assignments) up to `EXACT_MAX_PAIRS` values, else Monte Carlo with `rng`,
    counting the observed assignment (p = (1 + hits) / (1 + draws)) so p is never 0.
    An empty input (e.g. every difference zero) gives p = 1: no evidence of any difference.
    """
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        return 1.0
    observed = abs(values.sum())
    # Sums equal to the observed one up to rounding must count as "as extreme".
    tolerance = 1e-9 * max(1.0, float(np.abs(values).sum()))
    if n <= EXACT_MAX_PAIRS:
        hits = 0
        for start in range(0, 2**n, _CHUNK):  # assignment i flips value j where bit j of i is set
            codes = np.arange(start, min(start + _CHUNK, 2**n), dtype=np.int64)[:, None]
            signs = 1.0 - 2.0 * ((codes >> np.arange(n)) & 1)
            hits += int(np.sum(np.abs(signs @ values) >= observed - tolerance))
        return hits / 2**n
    rng = rng or np.random.default_rng(0)
    hits = 0
    for start in range(0, MONTE_CARLO_DRAWS, _CHUNK):
        draws = min(_CHUNK, MONTE_CARLO_DRAWS - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(draws, n))
        hits += int(np.sum(np.abs(signs @ values) >= observed - tolerance))
    return (1 + hits) / (1 + MONTE_CARLO_DRAWS)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, ties sharing their average rank (as the Wilcoxon test does)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks

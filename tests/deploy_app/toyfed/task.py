"""The ML of the stand-in app, free of Flower: a linear model, per-partition data, local GD.

Everything is float32 and seeded, so the same inputs give bitwise the same arrays in a
deployment and in-process.
"""

from __future__ import annotations

import numpy as np

NUM_FEATURES = 4
EXAMPLES_PER_PARTITION = (24, 40)  # unequal sizes make the FedAvg weighting matter


def initial_arrays(seed: int) -> dict[str, np.ndarray]:
    """The global model before round 1."""
    rng = np.random.default_rng(seed)
    return {
        "weight": rng.normal(size=NUM_FEATURES).astype(np.float32),
        "bias": np.zeros(1, dtype=np.float32),
    }


def load_partition(partition_id: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic regression dataset for one client, with a client-specific true weight."""
    rng = np.random.default_rng([seed, partition_id])
    n = EXAMPLES_PER_PARTITION[partition_id % len(EXAMPLES_PER_PARTITION)]
    x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
    true_weight = np.arange(1, NUM_FEATURES + 1, dtype=np.float32) * (1 + partition_id)
    y = x @ true_weight + np.float32(0.5) + rng.normal(scale=0.1, size=n).astype(np.float32)
    return x, y.astype(np.float32)


def train(
    arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, steps: int, lr: float
) -> dict[str, np.ndarray]:
    """Full-batch gradient descent on the squared error; returns new arrays."""
    weight, bias = arrays["weight"].copy(), arrays["bias"].copy()
    lr32 = np.float32(lr)
    for _ in range(steps):
        error = x @ weight + bias - y
        weight -= lr32 * np.float32(2 / len(y)) * (x.T @ error)
        bias -= lr32 * np.float32(2 / len(y)) * error.sum(keepdims=True)
    return {"weight": weight, "bias": bias}

"""Process-wide runtime settings: torch threads, seeding, the rich console.

Why here: on a 2-core machine torch's default thread count oversubscribes the cores as soon as
anything else runs (measured ~10x slower), so every entry point calls `configure_threads` once.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from rich.console import Console

console = Console(stderr=True)
"""Progress and logs go to stderr (silenced by `--quiet`) ..."""
output = Console()
"""... and results to stdout, so they survive `--quiet` and pipe cleanly."""


def set_quiet(quiet: bool) -> None:
    console.quiet = quiet


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: explicit value, else $FLEXMOE_THREADS, else the CPU count."""
    n = threads or int(os.environ.get("FLEXMOE_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that the same seed gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

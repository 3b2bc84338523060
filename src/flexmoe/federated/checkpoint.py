"""Atomic, per-round server checkpoints of a federated run.

A checkpoint is a directory written under a temporary name and renamed into place, so a run
killed at any moment leaves either the previous checkpoint or the new one, never a half one.
Client-side state (personal experts, SCAFFOLD control variates) lives on the clients' own disks,
versioned by round (see `client_state.py`), and is restored from the checkpoint's round.
"""

from __future__ import annotations

import copyreg
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load_file, save_file


@dataclass
class ServerCheckpoint:
    round: int
    arrays: dict[str, np.ndarray]
    """The global shared parameters after `round`."""
    strategy: Any
    """The strategy object (server optimiser state, SCAFFOLD's server control variate)."""
    rng_state: Any
    """Python `random` state used to sample clients."""
    ledger: Any
    """The communication ledger of the rounds so far."""
    meta: dict[str, Any]


class _Pickler(pickle.Pickler):
    """Pickles the memoryviews Flower's records may hold (as bytes, which they accept back)."""

    dispatch_table: ClassVar[dict] = {
        **copyreg.dispatch_table,
        memoryview: lambda m: (bytes, (m.tobytes(),)),
    }


def save_checkpoint(run_dir: Path, ckpt: ServerCheckpoint) -> Path:
    final = run_dir / "checkpoint"
    tmp = run_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in ckpt.arrays.items()}, tmp / "arrays.safetensors"
    )
    with open(tmp / "server_state.pkl", "wb") as f:
        _Pickler(f).dump(
            {"strategy": ckpt.strategy, "rng_state": ckpt.rng_state, "ledger": ckpt.ledger}
        )
    (tmp / "meta.json").write_text(json.dumps({"round": ckpt.round, **ckpt.meta}, indent=2))
    old = run_dir / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> ServerCheckpoint | None:
    """The latest complete checkpoint of `run_dir`, or None if it has none yet."""
    for name in ("checkpoint", "checkpoint.old"):
        path = run_dir / name
        if (path / "meta.json").is_file():
            meta = json.loads((path / "meta.json").read_text())
            with open(path / "server_state.pkl", "rb") as f:
                state = pickle.load(f)
            arrays = load_file(path / "arrays.safetensors")
            return ServerCheckpoint(
                meta.pop("round"),
                arrays,
                state["strategy"],
                state["rng_state"],
                state["ledger"],
                meta,
            )
    return None

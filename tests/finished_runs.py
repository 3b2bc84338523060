"""Finished tiny runs shared by the artifact and export tests, each built once per session.

Evaluation decodes one prompt at a time (batch 1), so a single prompt answered later through
`generate_text` must give exactly the run's prediction.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from federated_support import tiny_config, write_small_dolly

from flexmoe.federated.run import prepare_run_dir, run_methods


@cache
def finished_run(lm_dir: Path, root: Path, sharing: str, methods: tuple[str, ...]) -> Path:
    """A 2-round run of `methods` on the tiny LM under `root` (the run directory)."""
    root.mkdir(parents=True, exist_ok=True)
    data = write_small_dolly(root / "dolly_small.jsonl")
    cfg = tiny_config(
        lm_dir,
        data,
        methods,
        sharing=sharing,
        eval={"samples": 3, "max_new_tokens": 6, "batch_size": 1},
    )
    out = root / f"run-{sharing}"
    prepare_run_dir(out, cfg, resume=False)
    run_methods(cfg, out)
    return out


METHODS = ("flex", "fedavg", "local")
INPUT_IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def run_dir(tiny_lm_dir, tmp_path_factory):
    """Flex, fedavg and local, attention sharing."""
    return finished_run(tiny_lm_dir, tmp_path_factory.getbasetemp() / "runs", "attention", METHODS)


@pytest.fixture(scope="session")
def lora_run_dir(tiny_lm_dir, tmp_path_factory):
    """Flex with LoRA sharing."""
    return finished_run(tiny_lm_dir, tmp_path_factory.getbasetemp() / "runs", "lora", ("flex",))

"""Test-wide settings and fixtures.

Torch threads are fixed (2 cores; oversubscription costs 10x): $FLEXMOE_THREADS or 2.
"""

import os

import pytest

from flexmoe.runtime import configure_threads

configure_threads(int(os.environ.get("FLEXMOE_THREADS", "2")))
pytest_plugins = ["finished_runs"]  # session fixtures `run_dir`, `lora_run_dir`
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny Qwen2-MoE checkpoint directory with a trained BPE tokenizer (built once per session)."""
    from tiny_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm") / "qwen2_moe")

"""Which build of the built-in base model a run was made with, so it is never mixed with another.

A run's config says `model = "default"`, which means "the model the installed flexmoe builds".
When a new flexmoe version changes the pretraining recipe, "default" names another model (another
cache directory), and the run's checkpoints, personal experts and client states no longer fit it.
A new run records the directory it used in `base_model.json`; resuming, evaluating, generating or
exporting a run made with another build stops with a message instead of loading mismatched weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe.federated.config import RunConfig
from flexmoe.models.default_model import default_model_dir

BASE_MODEL_FILE = "base_model.json"


class BaseModelMismatchError(ValueError):
    """The run was made with another build of the built-in model than this flexmoe builds."""


def record_base_model(run_dir: Path, cfg: RunConfig, source: str) -> None:
    """Write which model directory (or hub id) `cfg.model` resolved to for this run."""
    record = {"model": cfg.model, "source": source}
    (Path(run_dir) / BASE_MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n")


def check_base_model(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse a run made with another build of the built-in model (runs without a record pass)."""
    path = Path(run_dir) / BASE_MODEL_FILE
    if cfg.model != "default" or not path.is_file():
        return
    recorded = json.loads(path.read_text())["source"]
    current = str(default_model_dir())
    if Path(recorded).name != Path(current).name:
        raise BaseModelMismatchError(
            f"{run_dir} was made with the built-in model {Path(recorded).name}, but this flexmoe "
            f"builds {Path(current).name} (another pretraining recipe); the run's checkpoints and "
            "personal experts only fit the model they were trained with. Use the flexmoe version "
            "that made the run, or start a new run."
        )

"""A finished tiny run copied and evaluated once per session, for the evaluation and report tests.

The copy keeps the run directory's name: client state is filed under it (state/<name>/...).
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

from finished_runs import finished_run

from flexmoe.evaluation.run_eval import EvalSettings, evaluate_run

METHODS = ("flex", "fedavg", "local")
SETTINGS = EvalSettings(
    mmlu_per_subject=2,
    mmlu_subjects=("astronomy", "philosophy", "sociology", "nutrition"),
    ppl_max_tokens=512,
    cost_prompts=2,
    cost_new_tokens=2,
    cost_repeats=1,
)


@cache
def run_copy(lm_dir: Path, root: Path, name: str) -> Path:
    """A fresh copy (at root/name/<run name>) of the shared finished run, not yet evaluated."""
    source = finished_run(lm_dir, root / "runs", "attention", METHODS)
    copy = root / name / source.name
    shutil.copytree(source, copy)
    return copy


@cache
def evaluated_run(lm_dir: Path, root: Path) -> Path:
    """A copy of the shared finished run with every metric evaluated (tiny settings)."""
    run_dir = run_copy(lm_dir, root, "evaluated")
    evaluate_run(run_dir, settings=SETTINGS, progress=False)
    return run_dir

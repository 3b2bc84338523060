"""What a report is built from: the seeds' summary, and each run's files where they still exist.

Tables need only the summary (`flexmoe.evaluation.seeds.aggregate_runs`); the training-loss,
communication and routing figures read the run directories (rounds.jsonl, results.json). A
report can be built from a run directory, a directory of seed runs, a list of run directories,
or a summary alone (a summary.json, or its dict): figures whose runs are gone are then left out,
and the report says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flexmoe.evaluation.seeds import (
    RESULTS_FILE,
    SUMMARY_FILE,
    SeedsError,
    aggregate_runs,
    find_run_dirs,
)
from flexmoe.runtime import console

ROUNDS_LOG = "rounds.jsonl"


class ReportError(ValueError):
    """A report that cannot be built from what was given; the message says what to pass."""


@dataclass
class RunData:
    seed: int
    dir: Path
    results: dict
    rounds: dict[str, list[dict]]
    """method -> its rounds.jsonl records (missing methods: absent)."""


@dataclass
class ReportInputs:
    summary: dict
    runs: list[RunData]
    """The runs found on disk, in the summary's seed order (may be fewer than its seeds)."""


Source = str | Path | Sequence[str | Path] | dict


def load_inputs(source: Source) -> ReportInputs:
    """Summary and run data from any of the accepted sources (see the module docstring)."""
    try:
        near = None
        if isinstance(source, dict):
            summary = source
        elif isinstance(source, (str, Path)) and Path(source).is_file():
            summary = json.loads(Path(source).read_text(encoding="utf-8"))
            near = Path(source).parent
        else:
            dirs = find_run_dirs(source) if isinstance(source, (str, Path)) else list(source)
            summary = aggregate_runs(_finished(dirs, source))
    except SeedsError as err:
        raise ReportError(str(err)) from None
    if "metrics" not in summary or "runs" not in summary:
        raise ReportError(
            f"{source} is not a flexmoe summary (no 'metrics' or 'runs'): pass a run directory, "
            f"a directory of seed runs or their {SUMMARY_FILE}"
        )
    runs = [run for entry in summary["runs"] if (run := _read_run(entry, near)) is not None]
    return ReportInputs(summary, runs)


def _finished(dirs: list[Path | str], source) -> list[Path]:
    """Run directories with results; unfinished ones are skipped with a reason, never silently."""
    finished = [Path(d) for d in dirs if (Path(d) / RESULTS_FILE).is_file()]
    if not finished:
        raise ReportError(
            f"no finished run in {source}: no {RESULTS_FILE} yet (finish the run with "
            "`flexmoe run --resume DIR`)"
        )
    skipped = len(dirs) - len(finished)
    if skipped:
        console.print(
            f"[yellow]warning:[/] {skipped} of {len(dirs)} run(s) have not finished and are left "
            "out of the report"
        )
    return finished


def _read_run(entry: dict, near: Path | None) -> RunData | None:
    """A summary's run, at its recorded path or (moved together) beside the summary file."""
    candidates = [Path(entry["dir"])]
    if near is not None:
        candidates.append(near / Path(entry["dir"]).name)
    run_dir = next((d for d in candidates if (d / RESULTS_FILE).is_file()), None)
    if run_dir is None:
        return None
    results = json.loads((run_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    rounds = {}
    for method in results["methods"]:
        log = run_dir / method / ROUNDS_LOG
        if log.is_file():
            lines = log.read_text(encoding="utf-8").splitlines()
            rounds[method] = [json.loads(line) for line in lines if line.strip()]
    return RunData(entry["seed"], run_dir, results, rounds)

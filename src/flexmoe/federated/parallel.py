"""Run several prepared run directories at once, each as a `flexmoe run --resume DIR` process.

Why processes: a small model's matmuls do not spread well over CPU cores, so on a CPU several
1-thread runs side by side finish more work than one run using every core (measured on the
2-core reference machine: see README, "All methods over three seeds"), and each process computes
exactly what the same run computes alone at its thread count. Each run logs to DIR/run.log; the
progress shown is the number of rounds the runs have logged.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flexmoe.runtime import console

LOG_FILE = "run.log"
POLL_SECONDS = 2.0
LOG_TAIL_LINES = 15


class ParallelRunError(RuntimeError):
    """A run process failed; the message carries the end of its log and how to continue."""


def run_in_processes(
    run_dirs: Sequence[Path], *, jobs: int, threads: int, rounds_per_run: int
) -> None:
    """Run each prepared directory in its own process, at most `jobs` at a time, each with
    `threads` torch threads. Raises ParallelRunError naming every run that failed."""
    pending = list(run_dirs)
    running: dict[Path, subprocess.Popen] = {}
    failed: list[str] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bars = {d: progress.add_task(d.name, total=rounds_per_run) for d in run_dirs}
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    run_dir = pending.pop(0)
                    running[run_dir] = _start(run_dir, threads)
                for run_dir, process in list(running.items()):
                    if process.poll() is not None:
                        del running[run_dir]
                        if process.returncode != 0:
                            failed.append(_failure(run_dir, process.returncode))
                for run_dir, bar in bars.items():
                    progress.update(bar, completed=logged_rounds(run_dir))
                if running:
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            for process in running.values():  # they got the same Ctrl-C: let them checkpoint
                process.wait()
            raise
    if failed:
        raise ParallelRunError("\n\n".join(failed))


def logged_rounds(run_dir: Path) -> int:
    """Training rounds logged so far by every method of a run (lines of its rounds.jsonl)."""
    total = 0
    for rounds in run_dir.glob("*/rounds.jsonl"):
        with open(rounds, encoding="utf-8") as f:
            total += sum(1 for line in f if line.strip())
    return total


def _start(run_dir: Path, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "flexmoe", "--threads", str(threads)]
    command += ["run", "--resume", str(run_dir)]
    console.log(f"{run_dir.name}: started ({threads} thread(s)); log: {run_dir / LOG_FILE}")
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _failure(run_dir: Path, code: int) -> str:
    lines = (run_dir / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    tail = "\n".join(lines[-LOG_TAIL_LINES:])
    return f"{run_dir} failed (exit code {code}); the end of {run_dir / LOG_FILE}:\n{tail}"

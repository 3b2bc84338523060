"""Run several prepared run directories at once, each as a `flexmoe run --resume DIR` process.

Why processes: a small model's matmuls do not spread well over CPU cores, so on a CPU several
1-thread runs side by side finish more work than one run using every core (measured on the
2-core reference machine: see README, "All methods over three seeds"), and each process computes
exactly what the same run computes alone at its thread count. Each run logs to DIR/run.log; the
progress shown is the number of rounds the runs have logged. Every process loads its own model:
memory (and GPU memory) grows with the number of jobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flexmoe.runtime import console

LOG_FILE = "run.log"
POLL_SECONDS = 2.0
STOP_SECONDS = 60.0
"""How long stopped runs get to write their checkpoint before they are killed."""
LOG_TAIL_LINES = 15


class ParallelRunError(RuntimeError):
    """A run process failed; the message carries the end of its log and how to continue."""


def run_in_processes(
    run_dirs: Sequence[Path], *, jobs: int, threads: int, rounds_per_run: int
) -> None:
    """Run each prepared directory in its own process, at most `jobs` at a time, each with
    `threads` torch threads. Raises ParallelRunError naming every run that failed.

    Interrupted (Ctrl-C, SIGTERM) or failing itself, it stops the runs still going (they
    checkpoint, so the same command continues them) before it returns."""
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
    with Progress(*columns, console=console) as progress, _sigterm_as_interrupt():
        bars = {d: progress.add_task(d.name, total=rounds_per_run) for d in run_dirs}
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    run_dir = pending.pop(0)
                    running[run_dir] = _start(run_dir, threads)
                for run_dir, process in list(running.items()):
                    if process.poll() is not None:
                        del running[run_dir]
                        if process.returncode == 0:
                            console.log(f"{run_dir.name}: finished")
                        else:
                            failed.append(_failure(run_dir, process.returncode))
                            console.log(f"[red]{failed[-1]}[/]")
                for run_dir, bar in bars.items():
                    progress.update(bar, completed=logged_rounds(run_dir))
                if running:
                    time.sleep(POLL_SECONDS)
        finally:
            _stop(running.values())
    if failed:
        raise ParallelRunError(
            "\n\n".join(failed) + "\n\nFix the cause, then run the same command again (same "
            "--out): finished runs are kept and the others continue from their checkpoints."
        )


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
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}  # plain text in the log
    console.log(f"{run_dir.name}: started ({threads} thread(s)); log: {run_dir / LOG_FILE}")
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _stop(processes) -> None:
    """Interrupt live runs as Ctrl-C does (they exit between two checkpoints), kill any that
    hang. After a Ctrl-C in the terminal they already have it: a moment first to exit on it."""
    live = [p for p in processes if p.poll() is None]
    _wait(live, seconds=2.0)
    for process in live:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    _wait(live, seconds=STOP_SECONDS)
    for process in live:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait(processes, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for process in processes:
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A scheduler's SIGTERM stops the runs like Ctrl-C (only the main thread can set it)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failure(run_dir: Path, code: int) -> str:
    log = run_dir / LOG_FILE
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    if code == -signal.SIGKILL:
        how += ", e.g. out of memory: fewer --jobs"
    tail = "\n".join(lines[-LOG_TAIL_LINES:])
    return f"{run_dir} failed ({how}); the end of {log}:\n{tail}"

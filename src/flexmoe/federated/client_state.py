"""A client's node-local state, versioned by round: personal tensors, local model, SCAFFOLD c_i.

State for round r is written to `round-000r.tmp` and renamed to `round-000r` when complete. A
client restores from the newest complete round not after the one the server names, so a run
killed mid-round and resumed from the server's checkpoint replays exactly, even if some clients
had already saved the interrupted round. Only the two newest rounds are kept.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_ROUND_DIR = re.compile(r"^round-(\d{4,})$")


def state_name(run_dir: str | Path) -> str:
    """The name a run's client state is filed under (`STATE_DIR/<name>/<method>/client-<id>`):
    the run directory's own name, so the state of several runs can share one state directory."""
    return Path(run_dir).resolve().name


class ClientStateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def rounds(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = (_ROUND_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self, at_most: int) -> Path | None:
        """The newest complete state saved in a round <= `at_most`, or None."""
        done = [r for r in self.rounds() if r <= at_most]
        return self.root / f"round-{done[-1]:04d}" if done else None

    @contextmanager
    def writing(self, server_round: int) -> Iterator[Path]:
        """A directory to write round `server_round`'s state into; committed on success."""
        final = self.root / f"round-{server_round:04d}"
        tmp = self.root / f"round-{server_round:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.rounds()[:-2]:
            shutil.rmtree(self.root / f"round-{old:04d}", ignore_errors=True)

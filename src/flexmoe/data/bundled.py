"""Read the datasets shipped inside the package, verifying each file against `manifest.json`.

The files are stored gzip-compressed (`<path>.gz`) next to the upstream manifest, which records the
SHA-256 of the *uncompressed* bytes. Each file is checked the first time a process reads it, so a
truncated or edited install fails loudly instead of silently training on different data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from flexmoe.data.records import DataError

BUNDLED_DIR = Path(__file__).parent / "bundled"
"""Where the shipped files live; tests point this at a copy to check corruption is detected."""

_verified: set[Path] = set()


@cache
def _manifest(bundled_dir: Path) -> dict[str, dict[str, Any]]:
    path = bundled_dir / "manifest.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(
            f"the bundled data manifest {path} is missing or unreadable ({err}); "
            "reinstall flexmoe (pip install --force-reinstall flexmoe)"
        ) from None
    return {entry["path"]: entry for entry in entries}


def bundled_files() -> list[str]:
    """Relative paths (as in manifest.json, uncompressed names) of every shipped data file."""
    return sorted(_manifest(BUNDLED_DIR))


def bundled_record_count(relative_path: str) -> int | None:
    """The manifest's record (JSONL line) count of a shipped file; None for plain-text files."""
    return _manifest(BUNDLED_DIR)[relative_path].get("records")


def read_bundled_bytes(relative_path: str) -> bytes:
    """The uncompressed bytes of a shipped file, checked against the manifest once per process."""
    entry = _manifest(BUNDLED_DIR).get(relative_path)
    if entry is None:
        raise DataError(
            f"{relative_path!r} is not a bundled data file; "
            f"known files: {', '.join(bundled_files())}"
        )
    path = BUNDLED_DIR / f"{relative_path}.gz"
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise DataError(
            f"bundled data file {path} is missing or corrupt ({err}); "
            "reinstall flexmoe (pip install --force-reinstall flexmoe)"
        ) from None
    if path not in _verified:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise DataError(
                f"bundled data file {path} is corrupt: its SHA-256 is {digest}, the manifest says "
                f"{entry['sha256']}; reinstall flexmoe (pip install --force-reinstall flexmoe)"
            )
        _verified.add(path)
    return data


def read_bundled_text(relative_path: str) -> str:
    """A shipped file decoded as UTF-8."""
    return read_bundled_bytes(relative_path).decode("utf-8")


def read_bundled_jsonl(relative_path: str) -> list[dict[str, Any]]:
    """A shipped JSONL file as a list of objects (the shipped files are known to be well formed)."""
    # split("\n"), not splitlines(): fields may hold a raw U+2028 or U+0085, where splitlines cuts.
    return [json.loads(line) for line in read_bundled_text(relative_path).split("\n") if line]

"""Write each client's share of a run's partition to its own directory, for one SuperNode each.

Why: in a deployment a client's data lives on its own machine, not in the run config. The
ClientApp reads `train.jsonl` and `test.jsonl` from the `data-dir` of its node config;
`export_client_data` writes exactly the records (and order) the embedded runtime gives that
client, so a deployed run trains on the same data as `flexmoe run`.

    python -m flexmoe.federated.export_data run-config.json nodes/

writes `nodes/<client name>/train.jsonl`, `.../test.jsonl`, `nodes/partition.json` (which
directory belongs to which `partition-id`) and `nodes/config.resolved.json` (the config to pass
to `flwr run` as `config`, so the server uses the same partition), and prints each SuperNode's
`--node-config` (add its `state-dir`).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

from flexmoe.data import InstructionRecord
from flexmoe.federated import task
from flexmoe.federated.config import RunConfig
from flexmoe.federated.messages import load_run_config
from flexmoe.runtime import output

_SAFE_DIR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ExportError(ValueError):
    """The client data cannot be written where asked."""


def client_dir_name(client_id: int, name: str) -> str:
    """The client's name when it is a safe directory name, else `client-<id>`.

    The ClientApp takes its client name from the directory name, so a plain name keeps
    personal-state metadata identical to the embedded runtime.
    """
    return name if _SAFE_DIR_NAME.fullmatch(name) else f"client-{client_id}"


def export_client_data(cfg: RunConfig, out_dir: str | Path) -> list[Path]:
    """Write every client's train/test split of `cfg`'s partition; return the dirs by partition id.

    `out_dir` must be new or empty: client data of another partition next to this one would be
    easy to hand to the wrong SuperNode.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty: export client data into a new or empty directory")
    partition = task.partition_for(cfg)
    names = [client_dir_name(c.client_id, c.name) for c in partition.clients]
    if len(set(names)) != len(names):
        names = [f"client-{c.client_id}" for c in partition.clients]
    dirs = [out / name for name in names]
    for client, path in zip(partition.clients, dirs, strict=True):
        path.mkdir(parents=True, exist_ok=True)
        _write_jsonl(path / "train.jsonl", client.train)
        _write_jsonl(path / "test.jsonl", client.test)
    manifest = {
        **partition.to_dict(),
        "data_dirs": {
            str(c.client_id): str(d) for c, d in zip(partition.clients, dirs, strict=True)
        },
    }
    (out / "partition.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out / "config.resolved.json").write_text(cfg.to_json() + "\n", encoding="utf-8")
    return dirs


def _write_jsonl(path: Path, records: list[InstructionRecord]) -> None:
    """One record per line with every field, so `load_instructions` rebuilds equal records."""
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(asdict(record)) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flexmoe.federated.export_data",
        description="Write each client's train.jsonl/test.jsonl for SuperNode data-dirs.",
    )
    parser.add_argument("config", help="the run's resolved config (JSON, TOML or YAML file)")
    parser.add_argument("out_dir", help="directory to write one sub-directory per client into")
    args = parser.parse_args(argv)
    try:
        dirs = export_client_data(load_run_config(args.config), args.out_dir)
    except (ExportError, ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    for partition_id, path in enumerate(dirs):
        node_config = (
            f'partition-id={partition_id} num-partitions={len(dirs)} data-dir="{path.resolve()}"'
        )
        output.print(node_config, soft_wrap=True, markup=False, highlight=False)


if __name__ == "__main__":
    main()

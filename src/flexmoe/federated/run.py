"""`flexmoe run`: every requested method as its own federated run, then one results file.

The embedded runtime is the default: an in-process Flower Grid (no Ray, no daemons) that calls
the same ClientApp and ServerApp a deployment runs, one client at a time, deterministically.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.clientapp import ClientApp

from flexmoe import __version__
from flexmoe.federated import task
from flexmoe.federated.base_model import check_base_model, record_base_model
from flexmoe.federated.client_app import app as client_app
from flexmoe.federated.client_state import state_name
from flexmoe.federated.config import RunConfig
from flexmoe.federated.grid import run_embedded
from flexmoe.federated.messages import decode_run_config
from flexmoe.federated.methods import resolve_methods
from flexmoe.federated.server_app import app as server_app
from flexmoe.runtime import console

RESULTS_SCHEMA = "flexmoe.results/1"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists, or has nothing to resume)."""


def check_new_run_dir(out: Path) -> None:
    """A new run never writes into a directory that already holds something."""
    if out.exists() and any(out.iterdir()):
        raise RunDirError(
            f"run directory {out} already exists and is not empty: pass --resume to continue "
            "it, or choose another --out"
        )


def prepare_run_dir(out: Path, cfg: RunConfig | None, resume: bool) -> RunConfig:
    """Create `out` for a new run (writing its config), or read the config of a run to resume."""
    config_file = out / "config.resolved.json"
    if resume:
        if not config_file.is_file():
            raise RunDirError(f"nothing to resume in {out}: it has no config.resolved.json")
        cfg = decode_run_config(config_file.read_text())
        check_base_model(out, cfg)
        check_state_name(out)
        return cfg
    check_new_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(cfg.to_json() + "\n")
    record_base_model(out, cfg, task.model_source(cfg))
    return cfg


def check_state_name(out: Path) -> None:
    """Client state is filed under the run directory's name: refuse a renamed run directory
    (resuming it would silently start every client afresh) and say how to fix it."""
    state, name = out / "state", state_name(out)
    filed = sorted(d.name for d in state.iterdir() if d.is_dir()) if state.is_dir() else []
    if filed and name not in filed:
        raise RunDirError(
            f"the client state in {state} is filed under {', '.join(filed)}, not under this "
            f"directory's name {name!r} (was it renamed?): rename the directory back to continue it"
        )


def run_methods(
    cfg: RunConfig,
    out: Path,
    *,
    stop_after: int | None = None,
    client: ClientApp = client_app,
) -> dict:
    """Run every method of `cfg` under `out` (resuming any that checkpointed) and collect results.

    `stop_after` ends every method after that round (checkpointed, as if the run were killed);
    `results.json` is then not written and `{}` is returned. `client` is the ClientApp every
    embedded node runs (flexmoe's; tests wrap it to observe messages or inject faults).
    """
    methods = resolve_methods(cfg.methods)
    partition = task.partition_for(cfg)
    console.print(partition.summary_table())
    num_clients = len(partition.clients)
    results = {}
    ran = False
    for method in methods:
        method_dir = out / method.name
        if not (method_dir / "result.json").is_file():
            ran = True
            console.rule(f"{method.name}: {method.description}")
            run_embedded(
                server_app,
                client,
                num_clients,
                run_config={
                    "config": cfg.to_json(),
                    "method": method.name,
                    "run-dir": str(out),
                    "stop-after": stop_after or 0,
                },
                node_configs=[{"state-dir": str(out / "state")}] * num_clients,
                seed=cfg.seed,
            )
        if (method_dir / "result.json").is_file():
            results[method.name] = json.loads((method_dir / "result.json").read_text())
    if len(results) < len(methods):  # stopped early by `stop_after`
        return {}
    if not ran and (out / "results.json").is_file():  # finished before: keep its evaluations
        return json.loads((out / "results.json").read_text())
    summary = build_results(cfg, partition, results)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def build_results(cfg: RunConfig, partition, results: dict) -> dict:
    """The stable `results.json` schema (documented in README, "Results file")."""
    fedavg_bytes = results.get("fedavg", {}).get("comm", {}).get("totals", {}).get("total_bytes")
    methods = {}
    for name, result in results.items():
        clients = result["clients"]
        scored = [c for c in clients.values() if "rougeL" in c]
        average = (
            {
                metric: sum(c[metric] for c in scored) / len(scored)
                for metric in ("rouge1", "rouge2", "rougeL")
            }
            if scored
            else {}
        )
        totals = result["comm"]["totals"]
        methods[name] = {
            "description": result["description"],
            "clients": clients,
            "average": average,
            "comm": {
                "total_bytes": totals["total_bytes"],
                "sent_bytes": totals["sent_bytes"],
                "received_bytes": totals["received_bytes"],
                "full_model_equivalent_bytes": result["comm"]["full_model"][
                    "equivalent_total_bytes"
                ],
                "ratio_to_full_model": result["comm"]["full_model"]["ratio"],
                "ratio_to_fedavg": totals["total_bytes"] / fedavg_bytes if fedavg_bytes else None,
                "per_round": [
                    {k: r[k] for k in ("round", "sent_bytes", "received_bytes", "cumulative_bytes")}
                    for r in result["comm"]["rounds"]
                ],
            },
            "train_seconds": result["train_seconds"],
            "shared_parameters": result["shared_parameters"],
        }
    return {
        "schema": RESULTS_SCHEMA,
        "flexmoe_version": __version__,
        "config_hash": cfg.hash(),
        "partition": {
            "strategy": partition.strategy,
            "hash": partition.hash,
            "clients": {
                str(c.client_id): {"name": c.name, "train": len(c.train), "test": len(c.test)}
                for c in partition.clients
            },
        },
        "seed": cfg.seed,
        "model": cfg.model,
        "methods": methods,
    }

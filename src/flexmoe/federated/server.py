"""The server side of one method's federated run: initial arrays, round loop, final evaluation.

Called by the ServerApp's `main` with whatever Grid Flower hands it (embedded, simulation or a
real deployment); all traffic goes through a `MeteredGrid`, so bytes are measured the same way
in every runtime.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flexmoe.federated import task
from flexmoe.federated.comm import CommLedger, MeteredGrid, full_model_bytes
from flexmoe.federated.config import RunConfig
from flexmoe.federated.local_training import cosine_lr
from flexmoe.federated.messages import encode_run_config
from flexmoe.federated.methods import Method
from flexmoe.federated.scaffold import CONTROL_DELTA_PREFIX
from flexmoe.federated.server_loop import RoundLoop, discover_partitions
from flexmoe.federated.strategies import make_strategy
from flexmoe.runtime import console, seed_everything


def base_config(cfg: RunConfig, method: Method, run_name: str) -> dict:
    """Config entries every message of the run carries."""
    return {"run-config": encode_run_config(cfg), "method": method.name, "run-name": run_name}


def serve_method(
    grid: Grid,
    cfg: RunConfig,
    method: Method,
    run_dir: Path,
    run_name: str,
    *,
    stop_after: int | None = None,
) -> dict | None:
    """Train `method` for `cfg.train.rounds` rounds (resuming from `run_dir`), then evaluate.

    Returns the method's result (also written to `run_dir/result.json`), or None when stopped
    early by `stop_after` (used to test resume).
    """
    seed_everything(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    ledger = CommLedger()
    metered = MeteredGrid(grid, ledger)
    mm = task.method_model(cfg, method, run_name, fresh=True)
    initial = {k: v.numpy() for k, v in task.shared_tensors(mm).items()}
    full_bytes = full_model_bytes(dict(mm.model.named_parameters()))
    partitions = discover_partitions(metered, timeout=3600)
    strategy = (
        make_strategy(method.strategy, cfg.server, len(partitions)) if method.aggregates else None
    )
    common = base_config(cfg, method, run_name)
    t = cfg.train

    def train_config(server_round: int) -> ConfigRecord:
        return ConfigRecord(
            {
                **common,
                "server-round": server_round,
                "restore-round": server_round - 1,
                "lr": cosine_lr(server_round, t.rounds, t.lr, t.min_lr),
                "local-steps": t.local_steps,
                "batch-size": t.batch_size,
            }
        )

    def reply_shapes(arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        shapes = {k: v.shape for k, v in arrays.items()}
        if method.strategy == "scaffold":
            shapes |= {CONTROL_DELTA_PREFIX + k: s for k, s in list(shapes.items())}
        return shapes

    def on_round_end(server_round: int, report: dict) -> None:
        clients = list(report["clients"].values())
        losses = [c["train-loss"] for c in clients]
        mean = sum(losses) / len(losses) if losses else float("nan")
        drifts = [c["routing_js"] for c in clients if "routing_js" in c]
        drift = f", routing JS from base {sum(drifts) / len(drifts):.4f} bits" if drifts else ""
        console.log(
            f"{method.name} round {server_round}/{t.rounds}: mean train loss {mean:.3f}{drift} "
            f"({len(losses)} clients, {report['seconds']:.1f} s)"
        )

    loop = RoundLoop(
        grid=metered,
        strategy=strategy,
        run_dir=run_dir,
        rounds=t.rounds,
        fraction=t.fraction_train,
        min_successful=t.min_successful_clients,
        seed=cfg.seed,
        train_config=train_config,
        reply_shapes=reply_shapes,
        ledger=ledger,
        on_round_end=on_round_end,
        partitions=partitions,
    )
    started = time.perf_counter()
    final = loop.run(initial, stop_after=stop_after)
    if stop_after is not None and stop_after < t.rounds:
        return None
    check_some_client_trained(run_dir / "rounds.jsonl", method.name)
    train_seconds = time.perf_counter() - started
    clients = evaluate_clients(metered, partitions, final, common, t.rounds)
    comm = ledger.summary(full_model_bytes=full_bytes)
    result = {
        "method": method.name,
        "run_name": run_name,
        "description": method.description,
        "clients": {str(pid): metrics for pid, metrics in clients.items()},
        "train_seconds": train_seconds,
        "shared_parameters": int(sum(v.size for v in initial.values())),
        "comm": comm,
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    if final:
        np.savez(run_dir / "final_shared.npz", **final)
    return result


class NoClientTrainedError(RuntimeError):
    """Every client failed in every round: there is nothing to evaluate or compare."""


def check_some_client_trained(rounds_log: Path, method: str) -> None:
    rounds = [json.loads(line) for line in rounds_log.read_text().splitlines()]
    if any(r["clients"] for r in rounds):
        return
    reasons = [reason for r in rounds for reason in r["excluded"].values()]
    raise NoClientTrainedError(
        f"{method}: every client failed in every round; the first failure: "
        f"{reasons[0] if reasons else 'no client replied'}"
    )


def evaluate_clients(
    grid: Grid,
    partitions: dict[int, int],
    arrays: dict[str, np.ndarray],
    common: dict,
    rounds: int,
) -> dict[int, dict]:
    """Every client evaluates the final model (global shared + its own personal state).

    Each reply names the client's data (its category or domain), so the server needs no copy of it.
    """
    content = {
        "config": ConfigRecord({**common, "server-round": rounds + 1, "restore-round": rounds})
    }
    if arrays:
        content["arrays"] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
    messages = [
        Message(RecordDict(content), message_type=MessageType.EVALUATE, dst_node_id=node)
        for node in partitions.values()
    ]
    by_node = {n: p for p, n in partitions.items()}
    results = {}
    for reply in grid.send_and_receive(messages, timeout=3600):
        pid = by_node[reply.metadata.src_node_id]
        if reply.has_error():
            console.log(f"[red]client {pid} failed to evaluate: {reply.error.reason}")
            results[pid] = {"name": f"client-{pid}", "error": reply.error.reason}
        else:
            name = str(reply.content["info"]["name"])
            results[pid] = {"name": name, **dict(reply.content["metrics"])}
    return dict(sorted(results.items()))

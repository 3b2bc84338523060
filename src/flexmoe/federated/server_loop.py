"""The server's round loop: sample, send, validate, aggregate, checkpoint — resumable.

Flower strategies do the aggregation (`configure_train` / `aggregate_train`); this loop adds what
a research run needs around them: seeded client sampling over partition ids (node ids are random
in deployment), replies sorted by partition before aggregation (bitwise-reproducible sums),
rejection of failed / non-finite / wrongly shaped updates, per-round metrics and an atomic
checkpoint after every round so `flexmoe run --resume` continues exactly where a run stopped.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flexmoe.federated.checkpoint import ServerCheckpoint, load_checkpoint, save_checkpoint
from flexmoe.federated.comm import CommLedger
from flexmoe.runtime import console

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


class NodeSubset(Grid):
    """A view of a Grid exposing only the sampled nodes, so a strategy 'samples' exactly them."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def set_run(self, run_id: int) -> None:
        self._grid.set_run(run_id)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return self._grid.send_and_receive(messages, timeout=timeout)


def discover_partitions(grid: Grid, timeout: float) -> dict[int, int]:
    """Ask every node which data partition it holds: partition id -> node id."""
    node_ids = sorted(grid.get_node_ids())
    queries = [
        Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
        for n in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(
                f"node {reply.metadata.src_node_id} did not report its partition: {reply.error.reason}"
            )
        pid = int(reply.content[CONFIG]["partition-id"])
        if pid in mapping:
            raise RuntimeError(f"two nodes claim partition {pid}: check each node's partition-id")
        mapping[pid] = reply.metadata.src_node_id
    return dict(sorted(mapping.items()))


def check_update(reply: Message, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a training reply must be excluded from aggregation, or None if it is sound."""
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    content = reply.content
    if METRICS not in content or "num-examples" not in content[METRICS]:
        return "reply has no metrics/num-examples"
    weight = content[METRICS]["num-examples"]
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
        return f"num-examples is {weight!r}, not a positive number (its aggregation weight)"
    if not expected:
        return None
    if ARRAYS not in content:
        return "reply carries no arrays"
    arrays = content[ARRAYS]
    if set(arrays.keys()) != set(expected):
        missing = sorted(set(expected) - set(arrays.keys()))[:3]
        extra = sorted(set(arrays.keys()) - set(expected))[:3]
        return f"unexpected array keys (missing {missing}, extra {extra})"
    for key, shape in expected.items():
        value = arrays[key].numpy()
        if value.shape != shape:
            return f"array {key} has shape {value.shape}, expected {shape}"
        if not np.isfinite(value).all():
            return f"array {key} contains NaN or Inf"
    return None


@dataclass
class RoundLoop:
    """Runs rounds `start..rounds` of one method and checkpoints after each."""

    grid: Grid
    strategy: Strategy | None
    """None for methods that aggregate nothing (`local`)."""
    run_dir: Path
    rounds: int
    fraction: float
    min_successful: int
    seed: int
    train_config: Callable[[int], ConfigRecord]
    """Round number -> the ConfigRecord sent to clients that round."""
    reply_shapes: Callable[[dict[str, np.ndarray]], dict[str, tuple[int, ...]]]
    """Global arrays -> the array keys and shapes a sound reply carries."""
    ledger: CommLedger
    timeout: float = 3600.0
    on_round_end: Callable[[int, dict], None] | None = None
    partitions: dict[int, int] = field(default_factory=dict)

    def run(
        self, initial: dict[str, np.ndarray], stop_after: int | None = None
    ) -> dict[str, np.ndarray]:
        """Train from the latest checkpoint (or `initial`) to the last round; return global arrays."""
        ckpt = load_checkpoint(self.run_dir)
        rng = random.Random(self.seed)
        arrays, start = initial, 1
        if ckpt is not None:
            arrays, start = ckpt.arrays, ckpt.round + 1
            self.strategy = ckpt.strategy
            rng.setstate(ckpt.rng_state)
            self.ledger.messages[:] = ckpt.ledger.messages
            console.log(f"resuming {self.run_dir.name} after round {ckpt.round}")
        self._truncate_round_log(start - 1)
        self.partitions = self.partitions or discover_partitions(self.grid, self.timeout)
        for server_round in range(start, self.rounds + 1):
            arrays = self.run_round(server_round, arrays, rng)
            save_checkpoint(
                self.run_dir,
                ServerCheckpoint(
                    server_round, arrays, self.strategy, rng.getstate(), self.ledger, {}
                ),
            )
            if stop_after is not None and server_round >= stop_after:
                break
        return arrays

    def _truncate_round_log(self, last_round: int) -> None:
        """Drop log lines of rounds after the checkpoint (a run killed mid-round wrote them)."""
        log = self.run_dir / "rounds.jsonl"
        if log.exists():
            lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
            log.write_text("".join(ln for ln in lines if json.loads(ln)["round"] <= last_round))

    def sample(self, rng: random.Random) -> list[int]:
        pids = sorted(self.partitions)
        k = max(1, round(self.fraction * len(pids)))
        return sorted(rng.sample(pids, k)) if k < len(pids) else pids

    def run_round(
        self, server_round: int, arrays: dict[str, np.ndarray], rng: random.Random
    ) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        sampled = self.sample(rng)
        nodes = [self.partitions[p] for p in sampled]
        config = self.train_config(server_round)
        if self.strategy is not None:
            record = ArrayRecord({k: _array(v) for k, v in arrays.items()})
            messages = self.strategy.configure_train(
                server_round, record, config, NodeSubset(self.grid, nodes)
            )
        else:
            messages = [
                Message(RecordDict({CONFIG: config}), message_type=MessageType.TRAIN, dst_node_id=n)
                for n in nodes
            ]
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        by_node = {n: p for p, n in self.partitions.items()}
        replies.sort(key=lambda m: by_node.get(m.metadata.src_node_id, -1))
        good, report = [], {"round": server_round, "clients": {}, "excluded": {}}
        expected = self.reply_shapes(arrays) if self.strategy is not None else {}
        for reply in replies:
            pid = by_node.get(reply.metadata.src_node_id, -1)
            problem = check_update(reply, expected)
            if problem:
                report["excluded"][pid] = problem
                console.log(f"[yellow]round {server_round}: client {pid} excluded: {problem}")
                continue
            good.append(reply)
            report["clients"][pid] = dict(reply.content[METRICS])
        if self.strategy is not None and len(good) >= self.min_successful:
            aggregated, _ = self.strategy.aggregate_train(server_round, good)
            if aggregated is not None:
                # Back to the global arrays' dtype: Flower's FedAdam returns float64 (its
                # bias-corrected step size is a float64 scalar), which would double every
                # later message.
                arrays = {k: v.numpy().astype(arrays[k].dtype) for k, v in aggregated.items()}
        elif self.strategy is not None:
            console.log(
                f"[red]round {server_round}: {len(good)} valid update(s) < minimum "
                f"{self.min_successful}; the global state is kept unchanged"
            )
            report["skipped_aggregation"] = True
        report["seconds"] = time.perf_counter() - started
        if self.on_round_end is not None:
            self.on_round_end(server_round, report)
        with open(self.run_dir / "rounds.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(report, default=float) + "\n")
        return arrays


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))

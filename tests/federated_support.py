"""Helpers for the federated runtime tests: a small Dolly file, tiny run configs, and a spy
ClientApp that runs flexmoe's real client handlers and records what crossed the wire."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from flexmoe import config as config_io
from flexmoe.data import load_instructions
from flexmoe.federated import client_app, task
from flexmoe.federated.config import RunConfig
from flexmoe.federated.partition import PAPER_CATEGORIES
from flexmoe.moe.roles import assign_roles

ALL_METHODS = (
    "flex",
    "fedavg",
    "fedprox",
    "scaffold",
    "fedavgm",
    "fedadagrad",
    "fedyogi",
    "fedadam",
    "local",
    "fedit",
    "flex-nogate",
    "flex-random-expert",
    "flex-r2",
)


def write_small_dolly(path: Path, sizes: tuple[int, ...] = (26, 16, 30, 22)) -> Path:
    """The shortest Dolly records of each paper category (`sizes[i]` of the i-th), as JSONL.

    Short records fit the tests' max_length, and encoding a hundred records instead of Dolly's
    thousands keeps each run's data preparation well under a second. Unequal sizes make
    sample-weighted and plain means differ.
    """
    rows = []
    for category, size in zip(PAPER_CATEGORIES, sizes, strict=True):
        records = load_instructions("dolly", categories=[category])
        records.sort(key=lambda r: (len(r.instruction) + len(r.context) + len(r.response), r.id))
        rows += [dataclasses.asdict(r) for r in records[:size]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tiny_config(model_dir: Path, data_file: Path, methods, **overrides) -> RunConfig:
    """A RunConfig that runs a method on the tiny LM in about a second (2 rounds by default)."""
    values = {
        "model": str(model_dir),
        "methods": list(methods),
        "train": {
            "rounds": 2,
            "local_steps": 2,
            "batch_size": 2,
            "lr": 1e-3,
            "min_lr": 5e-4,
            "max_length": 96,
        },
        "data": {"source": str(data_file), "test_per_client": 4},
        "eval": {"samples": 2, "max_new_tokens": 4},
        "flex": {"calibration_samples": 8, "calibration_max_length": 64},
    }
    for section, options in overrides.items():
        if isinstance(options, dict):
            values[section] = {**values.get(section, {}), **options}
        else:
            values[section] = options
    return config_io.build(RunConfig, values)


def without_timings(value):
    """`value` with every wall-clock entry (keys `seconds`, `train_seconds`) removed."""
    if isinstance(value, dict):
        return {
            k: without_timings(v) for k, v in value.items() if k not in ("seconds", "train_seconds")
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def digest(array: np.ndarray) -> str:
    """A content hash of an array (dtype and shape included), for bitwise comparisons."""
    array = np.ascontiguousarray(array)
    head = f"{array.dtype}{array.shape}".encode()
    return hashlib.blake2b(head + array.tobytes(), digest_size=16).hexdigest()


def digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {k: digest(v) for k, v in arrays.items()}


def record_arrays(message: Message) -> dict[str, np.ndarray] | None:
    """The arrays of a message's `arrays` record, or None when it carries none."""
    if not message.has_content() or "arrays" not in message.content:
        return None
    record: ArrayRecord = message.content["arrays"]
    return {k: v.numpy() for k, v in record.items()}


def model_digests() -> dict[str, str]:
    """Digests of every parameter of the process-wide model the client handlers use."""
    model = task._current.model
    return {n: digest(p.detach().cpu().numpy()) for n, p in model.named_parameters()}


@dataclass
class Exchange:
    """One instruction a client handled and its reply, as they crossed the wire."""

    method: str
    kind: str
    """train | evaluate"""
    partition: int
    server_round: int
    received: dict[str, str] | None
    """Digests of the arrays the client received (None: no arrays)."""
    replied: dict[str, str] | None
    """Digests of the arrays in the reply (None: no arrays, or a failed reply)."""
    reply_roles: dict[str, str] = field(default_factory=dict)
    """Role of each replied key in the client's model when it replied (personal state loaded)."""
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    """The instruction's config, without the (long) run configuration."""
    received_arrays: dict[str, np.ndarray] | None = None
    replied_arrays: dict[str, np.ndarray] | None = None
    model_after: dict[str, str] | None = None
    """evaluate: digests of the client's whole model as it was evaluated."""


Corruption = Callable[[Exchange, Message], Message]
"""Given what a client did and its reply, the reply to send instead (to inject faults)."""


class Spy:
    """A ClientApp around flexmoe's real handlers that records every exchange.

    Full arrays are kept only for methods in `keep_arrays` (digests for the others), so a run of
    every method stays light. `corrupt` may replace a train reply (fault injection).
    """

    def __init__(
        self, keep_arrays: tuple[str, ...] = (), corrupt: Corruption | None = None
    ) -> None:
        self.exchanges: list[Exchange] = []
        self.app = ClientApp()
        self.app.query()(client_app.query)

        @self.app.train()
        def train(msg: Message, context: Context) -> Message:
            reply = client_app.train(msg, context)
            exchange = self._record("train", msg, context, reply, keep_arrays)
            return corrupt(exchange, reply) if corrupt is not None else reply

        @self.app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:
            reply = client_app.evaluate(msg, context)
            exchange = self._record("evaluate", msg, context, reply, keep_arrays)
            exchange.model_after = model_digests()
            return reply

    def _record(
        self, kind: str, msg: Message, context: Context, reply: Message, keep: tuple[str, ...]
    ) -> Exchange:
        config = msg.content["config"]
        method = str(config["method"])
        received, replied = record_arrays(msg), record_arrays(reply)
        roles = assign_roles(task._current.model) if replied else {}
        exchange = Exchange(
            method=method,
            kind=kind,
            partition=int(context.node_config["partition-id"]),
            server_round=int(config["server-round"]),
            received=digests(received) if received is not None else None,
            replied=digests(replied) if replied is not None else None,
            reply_roles={k: str(roles[k]) for k in replied or {} if k in roles},
            metrics=dict(reply.content["metrics"]),
            config={k: v for k, v in config.items() if k != "run-config"},
            received_arrays=received if method in keep else None,
            replied_arrays=replied if method in keep else None,
        )
        self.exchanges.append(exchange)
        return exchange

    def select(self, method: str, kind: str, server_round: int | None = None) -> list[Exchange]:
        """The exchanges of `method` and `kind` (optionally of one round), by partition."""
        found = [
            e
            for e in self.exchanges
            if e.method == method
            and e.kind == kind
            and (server_round is None or e.server_round == server_round)
        ]
        return sorted(found, key=lambda e: e.partition)


def weighted_mean(exchanges: list[Exchange], key: str) -> np.ndarray:
    """FedAvg by hand: the num-examples-weighted mean (float64) of `key` in the replies."""
    weights = [e.metrics["num-examples"] for e in exchanges]
    pairs = zip(weights, exchanges, strict=True)
    return sum(w * e.replied_arrays[key].astype(np.float64) for w, e in pairs) / sum(weights)

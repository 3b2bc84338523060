"""Communication accounting: the bytes every message of a run puts on the wire, per round and node.

What is counted. Flower 1.41 does not send a Message as one protobuf: it splits it into
content-addressed objects (the Message with its metadata, its RecordDict, each record, each Array
and the <= 5 MiB chunks of each Array's data) and each node pulls/pushes them one by one. A
message's size here is the sum of the serialised sizes of its distinct objects — exactly the
`object_content` bytes that the PushObject/PullObject calls carry, which the SuperLink itself counts
as run traffic. Not counted: the per-request envelopes (object ids, metadata copies, HTTP framing),
a few hundred bytes per message. Identical objects inside one message travel once (e.g. two
all-zero tensors of the same shape), so they are counted once.

How it is measured. `MeteredGrid` wraps whatever Grid the ServerApp is given (the in-process
`EmbeddedGrid`, Flower's simulation or a real deployment) and sizes the messages going out and the
replies coming back on the server side, so one mechanism serves every runtime.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, SType
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.run import Run

Direction = Literal["sent", "received"]
"""Seen from the server: `sent` = server -> client, `received` = client -> server."""

_OBJECT_ID_CHARS = 64  # an object id is a sha256 hex digest


class MessageBytes(NamedTuple):
    total: int
    """All distinct serialised objects of the message."""
    arrays: int
    """The part that belongs to its ArrayRecords (the model payload)."""


def message_bytes(message: Message) -> MessageBytes:
    """The bytes `message` puts on the wire, and how many of them are its arrays."""
    return measure_messages([message])[0]


def measure_messages(messages: Sequence[Message]) -> list[MessageBytes]:
    """`message_bytes` of each message; objects shared between them (a broadcast model) are
    serialised once, not once per message."""
    sizes: dict[str, int] = {}  # object ids are content hashes, so a size never goes stale

    def tree_sizes(obj: InflatableObject) -> dict[str, int]:
        objects = get_all_nested_objects(obj)
        for oid in objects.keys() - sizes.keys():
            sizes[oid] = len(objects[oid].deflate())
        return {oid: sizes[oid] for oid in objects}

    measured = []
    with no_object_id_recompute():
        for message in messages:
            total = tree_sizes(message)
            array_ids: set[str] = set()
            if message.has_content():
                for record in message.content.array_records.values():
                    array_ids |= tree_sizes(record).keys()
            measured.append(MessageBytes(sum(total.values()), sum(total[oid] for oid in array_ids)))
    return measured


def record_bytes(record: ArrayRecord) -> int:
    """The bytes an ArrayRecord adds to a message (measured by serialising it)."""
    with no_object_id_recompute():
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def full_model_bytes(tensors: Mapping[str, Any], dtype: str = "float32") -> int:
    """What an ArrayRecord of these tensors in `dtype` would add to a message, from shapes only.

    `tensors` maps names to tensors (any object with `.shape`, e.g. a state dict on the `meta`
    device) or to shapes, so the full-model cost of a model too large to materialise (the paper's
    14B-parameter MoE) can be computed. Exact when no two arrays and no two 5 MiB chunks have
    identical contents (true for trained weights); otherwise Flower sends duplicates once and this
    is an upper bound. `tests/test_grid.py` checks it against `record_bytes`.
    """
    np_dtype = np.dtype(dtype)
    total = 0
    for value in tensors.values():
        shape = tuple(int(d) for d in getattr(value, "shape", value))
        data_len = _npy_header_len(shape, np_dtype) + math.prod(shape) * np_dtype.itemsize
        chunk_lens = [
            min(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, data_len - start)
            for start in range(0, data_len, FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
        ]
        total += sum(_object_size("ArrayChunk", 0, n) for n in chunk_lens)
        metadata = {
            "dtype": str(np_dtype),
            "shape": list(shape),
            "stype": SType.NUMPY,
            "arraychunk_ids": list(range(len(chunk_lens))),
        }
        total += _object_size("Array", len(chunk_lens), len(json.dumps(metadata).encode()))
    refs = json.dumps({name: "0" * _OBJECT_ID_CHARS for name in tensors})
    return total + _object_size("ArrayRecord", len(tensors), len(refs.encode()))


def _object_size(type_name: str, num_children: int, body_len: int) -> int:
    """Size of a deflated object: `<type> <child ids joined by ','> <body length>\\0<body>`."""
    children = max(0, num_children * (_OBJECT_ID_CHARS + 1) - 1)
    head = f"{type_name}{HEAD_VALUE_DIVIDER}{'x' * children}{HEAD_VALUE_DIVIDER}{body_len}"
    return len(head) + len(HEAD_BODY_DIVIDER) + body_len


def _npy_header_len(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Length of the `.npy` header `np.save` writes before the data (Flower's Array format)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # header too long for format 1.0 (huge number of dimensions)
        np.lib.format.write_array_header_2_0(buffer, header)
    return len(buffer.getvalue())


@dataclass(frozen=True)
class MessageTraffic:
    """One message that crossed the grid."""

    round: int
    """The server round (from the message's group_id or its config's `server-round`; 0 = none)."""
    kind: str
    """The message type: train, evaluate, query (optionally `.action`)."""
    node_id: int
    direction: Direction
    num_bytes: int
    array_bytes: int
    failed: bool = False
    """A reply that carries an Error instead of content."""


class CommLedger:
    """Every message of a run with its size; summarised per round, per node and in total."""

    def __init__(self) -> None:
        self.messages: list[MessageTraffic] = []

    def record(
        self, message: Message, direction: Direction, server_round: int, size: MessageBytes
    ) -> None:
        meta = message.metadata
        self.messages.append(
            MessageTraffic(
                round=server_round,
                kind=meta.message_type,
                node_id=meta.dst_node_id if direction == "sent" else meta.src_node_id,
                direction=direction,
                num_bytes=size.total,
                array_bytes=size.arrays,
                failed=message.has_error(),
            )
        )

    def totals(self) -> dict[str, int]:
        sent = [m for m in self.messages if m.direction == "sent"]
        received = [m for m in self.messages if m.direction == "received"]
        return {
            "sent_bytes": sum(m.num_bytes for m in sent),
            "received_bytes": sum(m.num_bytes for m in received),
            "total_bytes": sum(m.num_bytes for m in self.messages),
            "messages_sent": len(sent),
            "replies_received": len(received),
            "failed_replies": sum(m.failed for m in received),
        }

    def summary(
        self, full_model_bytes: int | None = None, node_names: Mapping[int, str] | None = None
    ) -> dict[str, Any]:
        """Totals, per-round (with per-node and per-kind splits and a running total), per node.

        With `full_model_bytes` (from `full_model_bytes()` or `record_bytes()` of the full model),
        it adds what the same exchange would have cost had every message that carried model arrays
        carried the full model instead, and the ratio measured / full-model.
        """

        def name(node_id: int) -> str:
            return (node_names or {}).get(node_id, str(node_id))

        rounds: dict[int, dict[str, Any]] = {}
        nodes: dict[str, dict[str, int]] = defaultdict(_no_bytes)
        for m in self.messages:
            entry = rounds.setdefault(
                m.round,
                {
                    **_no_bytes(),
                    "by_kind": defaultdict(_no_bytes),
                    "by_node": defaultdict(_no_bytes),
                },
            )
            key = f"{m.direction}_bytes"
            entry[key] += m.num_bytes
            entry["by_kind"][m.kind][key] += m.num_bytes
            entry["by_node"][name(m.node_id)][key] += m.num_bytes
            nodes[name(m.node_id)][key] += m.num_bytes
        cumulative = 0
        per_round = []
        for r in sorted(rounds):
            entry = rounds[r]
            cumulative += entry["sent_bytes"] + entry["received_bytes"]
            per_round.append(
                {
                    "round": r,
                    "sent_bytes": entry["sent_bytes"],
                    "received_bytes": entry["received_bytes"],
                    "cumulative_bytes": cumulative,
                    "by_kind": {k: dict(v) for k, v in sorted(entry["by_kind"].items())},
                    "by_node": {k: dict(v) for k, v in sorted(entry["by_node"].items())},
                }
            )
        summary: dict[str, Any] = {
            "counted": "serialised Flower objects of each message (PushObject/PullObject payload)",
            "totals": self.totals(),
            "rounds": per_round,
            "nodes": {k: dict(v) for k, v in sorted(nodes.items())},
        }
        if full_model_bytes is not None:
            equivalent = sum(
                m.num_bytes - m.array_bytes + full_model_bytes
                if carries_full_model(m)
                else m.num_bytes
                for m in self.messages
            )
            measured = summary["totals"]["total_bytes"]
            summary["full_model"] = {
                "arrays_bytes_per_message": full_model_bytes,
                "equivalent_total_bytes": equivalent,
                "ratio": measured / equivalent if equivalent else None,
            }
        return summary

    def write_json(self, path: str | Path, **summary_options: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(**summary_options), indent=2) + "\n")
        return path


def carries_full_model(m: MessageTraffic) -> bool:
    """Whether MoE+FedAvg would put the full model in this message: every message that carries
    arrays, plus the train messages (both ways) and the evaluate requests of methods that send
    none (`local`), so their equivalent is also a full-model exchange."""
    if m.array_bytes or m.failed:
        return bool(m.array_bytes)
    kind = m.kind.split(".")[0]
    return kind == "train" or (kind == "evaluate" and m.direction == "sent")


def _no_bytes() -> dict[str, int]:
    return {"sent_bytes": 0, "received_bytes": 0}


def message_round(message: Message) -> int:
    """The server round a message belongs to: its numeric group_id, else `server-round` in its
    config (what Flower's built-in strategies set), else 0."""
    group = message.metadata.group_id
    if group.isdigit():
        return int(group)
    if message.has_content():
        for config in message.content.config_records.values():
            value = config.get("server-round")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return 0


class MeteredGrid(Grid):
    """A Grid that forwards everything to `inner` and records each message's size in `ledger`.

    Wrap the grid a ServerApp receives (`grid = MeteredGrid(grid, ledger)`) before handing it to a
    strategy; it works the same in-process, in simulation and in deployment.
    """

    def __init__(self, inner: Grid, ledger: CommLedger | None = None) -> None:
        self.inner = inner
        self.ledger = ledger if ledger is not None else CommLedger()
        self._round_of_instruction: dict[str, int] = {}

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        rounds = self._record_sent(messages)
        message_ids = list(self.inner.push_messages(messages))
        self._remember(messages, rounds)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._record_received(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        rounds = self._record_sent(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._remember(messages, rounds)  # the inner grid has set the message ids by now
        self._record_received(replies)
        return replies

    def _record_sent(self, messages: Sequence[Message]) -> list[int]:
        rounds = [message_round(m) for m in messages]
        sizes = measure_messages(messages)
        for message, server_round, size in zip(messages, rounds, sizes, strict=True):
            self.ledger.record(message, "sent", server_round, size)
        return rounds

    def _remember(self, messages: Sequence[Message], rounds: Sequence[int]) -> None:
        for message, server_round in zip(messages, rounds, strict=True):
            self._round_of_instruction[message.metadata.message_id] = server_round

    def _record_received(self, replies: Sequence[Message]) -> None:
        for reply, size in zip(replies, measure_messages(replies), strict=True):
            server_round = self._round_of_instruction.pop(reply.metadata.reply_to_message_id, 0)
            self.ledger.record(reply, "received", server_round, size)

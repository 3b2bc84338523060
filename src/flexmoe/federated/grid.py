"""Run a Flower ServerApp and ClientApp in one process: no Ray, no SuperLink, deterministic.

`EmbeddedGrid` is a `flwr.serverapp.Grid` that delivers each message by calling the ClientApp
directly, one node at a time in node-id order. It keeps what makes deployment deployment:
- every message is serialised into Flower's wire objects and rebuilt from them on the other side
  (the code path `flwr`'s own HTTP grid and ClientApp process use), so what a ClientApp receives is
  a copy, never the server's object, and anything that cannot travel fails here too;
- each node has its own persistent `Context` (node_config `partition-id`, `num-partitions` plus
  any extra keys per node; the shared run_config; `state` carried across rounds, also serialised);
- a ClientApp that raises produces a reply carrying an `Error`, exactly as Flower builds it, so
  strategies count it as a failure.
Node ids are random 63-bit integers like Flower's, but drawn from a seeded generator.

`run_embedded` runs a `ServerApp` object (its `@app.main()` function, lifespan included) on such a
grid and returns the server's and the nodes' contexts.
"""

from __future__ import annotations

import logging
import os
import random
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from flwr.app import Context, Error, Message, RecordDict, UserConfig, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.common.logger import update_console_handler
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from flexmoe.runtime import console


class GridError(ValueError):
    """A message the grid cannot deliver (unknown node, not an instruction, ...)."""


@dataclass
class Packet:
    """A message in transit: its id and its serialised objects."""

    message_id: str
    objects: dict[str, bytes]


def serialise(message: Message) -> Packet:
    """Turn a message into Flower's wire objects; sets its message id as Flower's grids do.

    Call it inside `no_object_id_recompute()` to hash objects shared by several messages once.
    """
    message_id = message.object_id
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    message.metadata.__dict__["_message_id"] = message_id
    return Packet(message_id, objects)


def deserialise(packet: Packet) -> Message:
    """Rebuild a message from its wire objects: a fresh object sharing nothing with the sender."""
    message = inflate_object_from_contents(packet.message_id, dict(packet.objects))
    assert isinstance(message, Message)
    message.metadata.__dict__["_message_id"] = packet.message_id
    return message


class EmbeddedGrid(Grid):
    """A Grid whose nodes are in-process calls of `client_app`, run sequentially in node-id order.

    `node_configs[i]` (optional) adds keys to the node_config of partition i. `timeout` arguments
    are accepted and ignored: every message is answered before `push_messages` returns.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_config: UserConfig | None = None,
        node_configs: Sequence[Mapping[str, UserConfigValue]] | None = None,
        seed: int = 0,
    ) -> None:
        if num_nodes < 1:
            raise GridError(f"num_nodes must be >= 1, got {num_nodes}")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise GridError(
                f"node_configs has {len(node_configs)} entries for {num_nodes} nodes: "
                "give one mapping per node (partition id order)"
            )
        for where, config in [("run_config", run_config or {})] + [
            (f"node_configs[{i}]", c) for i, c in enumerate(node_configs or [])
        ]:
            _check_user_config(where, config)
        for i, config in enumerate(node_configs or []):
            if {PARTITION_ID_KEY, NUM_PARTITIONS_KEY} & config.keys():
                raise GridError(
                    f"node_configs[{i}] sets {PARTITION_ID_KEY}/{NUM_PARTITIONS_KEY}, which the "
                    "grid assigns itself (the i-th entry belongs to partition i)"
                )
        rng = random.Random(seed)
        self._run = Run.create_empty(rng.getrandbits(63))
        self.client_app = client_app
        node_ids = _distinct_ids(rng, num_nodes, exclude={SUPERLINK_NODE_ID})
        self.partition_of = {node_id: i for i, node_id in enumerate(node_ids)}
        """Node id -> partition id."""
        self.contexts: dict[int, Context] = {}
        """Each node's persistent Context, by node id."""
        for node_id, partition_id in self.partition_of.items():
            extra = dict(node_configs[partition_id]) if node_configs is not None else {}
            node_config = {PARTITION_ID_KEY: partition_id, NUM_PARTITIONS_KEY: num_nodes, **extra}
            self.contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        self._replies: dict[str, Packet] = {}  # by the id of the message they answer

    def set_run(self, run: Run) -> None:
        if run.run_id != self._run.run_id:
            raise GridError(
                f"this EmbeddedGrid hosts run {self._run.run_id}, not run {run.run_id}; "
                "create one grid per run"
            )
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return sorted(self.partition_of)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver every message (nodes in ascending id order) and keep the replies for pulling."""
        packets = []
        with no_object_id_recompute():  # as Flower's grids push: shared objects hashed once
            for message in messages:
                self._check_instruction(message)
                packets.append((message.metadata.dst_node_id, serialise(message)))
        for node_id, packet in sorted(packets, key=lambda item: item[0]):
            reply = self._deliver(node_id, packet)
            with no_object_id_recompute():
                self._replies[packet.message_id] = serialise(reply)
        return [packet.message_id for _, packet in packets]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to `message_ids` that have not been pulled yet, in node-id order."""
        wanted = set(message_ids)
        ready = [mid for mid in self._replies if mid in wanted]
        return [deserialise(self._replies.pop(mid)) for mid in ready]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _check_instruction(self, message: Message) -> None:
        meta = message.metadata
        if meta.dst_node_id not in self.partition_of:
            raise GridError(
                f"message of type {meta.message_type!r} is addressed to node {meta.dst_node_id}, "
                f"which is not in this grid; use grid.get_node_ids() ({len(self.partition_of)} "
                "nodes)"
            )
        if meta.reply_to_message_id or message.has_error() or meta.ttl <= 0:
            raise GridError(
                "only new instruction messages with content and a positive ttl can be pushed; "
                "build them with Message(content, dst_node_id, message_type)"
            )

    def _deliver(self, node_id: int, packet: Packet) -> Message:
        """Run the ClientApp on a fresh copy of the message and of the node's context."""
        message = deserialise(packet)
        stored = self.contexts[node_id]
        context = context_from_proto(context_to_proto(stored))
        try:
            reply = self.client_app(message, context)
            if not isinstance(reply, Message):
                raise TypeError(f"the ClientApp returned {type(reply).__name__}, not a Message")
            if reply.metadata.reply_to_message_id != message.metadata.message_id:
                raise TypeError("the ClientApp's reply must be built with reply_to=<the message>")
        except Exception as ex:  # a failing client is a failed reply, as in Flower
            partition = self.partition_of[node_id]
            console.print(
                f"[yellow]ClientApp on node {node_id} (partition {partition}) raised "
                f"{type(ex).__name__}: {ex}[/yellow]",
                highlight=False,
            )
            console.print(traceback.format_exc(), markup=False, highlight=False, style="dim")
            # Flower's reason format: "<class 'ZeroDivisionError'>:<'division by zero'>"
            reason = f"{type(ex)}:<'{ex}'>"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
        self.contexts[node_id] = context  # a failed run leaves the node's state untouched
        return reply


def _check_user_config(where: str, config: Mapping[str, UserConfigValue]) -> None:
    """Flower configs hold only bool/int/float/str; fail here rather than deep in its serialiser."""
    bad = {
        k: type(v).__name__
        for k, v in config.items()
        if not isinstance(v, bool | int | float | str)
    }
    if bad:
        raise GridError(
            f"{where} values must be bool, int, float or str; got {bad} (e.g. pass paths as str)"
        )


def _distinct_ids(rng: random.Random, count: int, exclude: set[int]) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        candidate = rng.getrandbits(63)
        if candidate not in exclude and candidate not in ids:
            ids.append(candidate)
    return ids


@dataclass
class EmbeddedRun:
    """What an in-process run leaves behind."""

    server_context: Context
    node_contexts: dict[int, Context]
    """Each node's final Context, by partition id."""


def run_embedded(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    run_config: UserConfig | None = None,
    node_configs: Sequence[Mapping[str, UserConfigValue]] | None = None,
    *,
    seed: int = 0,
) -> EmbeddedRun:
    """Run `server_app` against `num_nodes` in-process copies of `client_app`.

    The ServerApp object is called as Flower calls it (`server_app(grid, context)`: lifespan, then
    its `@app.main()` function) with a server Context holding `run_config`.
    """
    match_flower_logs()
    grid = EmbeddedGrid(
        client_app, num_nodes, run_config=run_config, node_configs=node_configs, seed=seed
    )
    server_context = Context(
        run_id=grid.run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )
    with server_identity(grid.run.run_id):
        server_app(grid=grid, context=server_context)
    return EmbeddedRun(
        server_context=server_context,
        node_contexts={grid.partition_of[n]: ctx for n, ctx in grid.contexts.items()},
    )


def match_flower_logs() -> None:
    """Flower's log lines follow flexmoe's console: colour codes only on a terminal (not in
    a piped log file), and `--quiet` hides its INFO lines as it hides ours."""
    level = "WARNING" if console.quiet else os.environ.get("FLWR_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():  # Flower ignores a mistyped level too
        level = "INFO"
    update_console_handler(level=level, colored=console.is_terminal)


@contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """Act as the ServerApp process of run `run_id` (needed to build a Message outside a run).

    A new Message takes its run id and source node from Flower's process-wide `TaskIdentity`,
    which Flower's runners set; this sets it for the block and restores it afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved

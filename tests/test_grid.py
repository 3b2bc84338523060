"""EmbeddedGrid runs real Flower apps in-process; MeteredGrid counts the bytes they exchange."""

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flexmoe.federated import grid as grid_module
from flexmoe.federated.comm import (
    CommLedger,
    MeteredGrid,
    full_model_bytes,
    message_bytes,
    record_bytes,
)
from flexmoe.federated.grid import EmbeddedGrid, GridError, run_embedded, server_identity

INITIAL = np.array([0.5, -1.0, 2.0], dtype=np.float32)
EXAMPLES = {0: 10, 1: 30, 2: 20}


def make_client_app(failing_partition: int | None = None) -> ClientApp:
    """Client p replies x + (p + 1) with weight EXAMPLES[p] and counts its calls in its state."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        calls = int(context.state.get("calls", MetricRecord({"n": 0}))["n"]) + 1
        context.state["calls"] = MetricRecord({"n": calls})
        if partition == failing_partition:
            raise RuntimeError(f"partition {partition} cannot train")
        x = msg.content["arrays"]["w"].numpy()
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(x + np.float32(partition + 1))}),
                "metrics": MetricRecord({"num-examples": EXAMPLES[partition]}),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        loss = float(np.abs(msg.content["arrays"]["w"].numpy()).sum())
        metrics = MetricRecord({"loss": loss, "num-examples": 1})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def make_server_app(ledger: CommLedger, evaluate: bool = False) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(0)  # FedAvg samples nodes with Python's global RNG
        strategy = FedAvg(
            fraction_evaluate=1.0 if evaluate else 0.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
        )
        result = strategy.start(
            grid=MeteredGrid(grid, ledger),
            initial_arrays=ArrayRecord({"w": Array(INITIAL)}),
            num_rounds=int(context.run_config["rounds"]),
        )
        context.state["final"] = result.arrays

    return app


def test_fedavg_over_embedded_grid_reproduces_the_weighted_mean_and_keeps_node_state():
    ledger = CommLedger()
    run = run_embedded(
        make_server_app(ledger),
        make_client_app(),
        num_nodes=2,
        run_config={"rounds": 2},
        node_configs=[{"data-dir": "/data/a"}, {"data-dir": "/data/b"}],
    )
    # Each round: (10 * (x + 1) + 30 * (x + 2)) / 40 = x + 1.75
    final = run.server_context.state["final"]["w"].numpy()
    np.testing.assert_allclose(final, INITIAL + 2 * 1.75, rtol=0, atol=1e-6)
    for partition, context in run.node_contexts.items():
        assert context.node_config["partition-id"] == partition
        assert context.node_config["num-partitions"] == 2
        assert context.node_config["data-dir"] == ["/data/a", "/data/b"][partition]
        assert context.run_config == {"rounds": 2}
        assert context.state["calls"]["n"] == 2  # state persisted across the two rounds
    assert [entry["round"] for entry in ledger.summary()["rounds"]] == [1, 2]


def test_a_client_that_raises_is_a_failed_reply_excluded_from_aggregation():
    ledger = CommLedger()
    run = run_embedded(
        make_server_app(ledger), make_client_app(failing_partition=1), 3, {"rounds": 1}
    )
    # Only partitions 0 (x + 1, weight 10) and 2 (x + 3, weight 20) count: x + 70 / 30
    final = run.server_context.state["final"]["w"].numpy()
    np.testing.assert_allclose(final, INITIAL + 70 / 30, rtol=0, atol=1e-6)
    replies = [m for m in ledger.messages if m.direction == "received"]
    assert sorted(m.failed for m in replies) == [False, False, True]
    # A failed run leaves the node's state as it was before the message
    assert "calls" not in run.node_contexts[1].state
    assert run.node_contexts[0].state["calls"]["n"] == 1


def test_error_reply_is_built_as_flower_builds_it():
    grid = EmbeddedGrid(make_client_app(failing_partition=0), 1)
    with server_identity(grid.run.run_id):
        message = Message(
            RecordDict({"arrays": ArrayRecord({"w": Array(INITIAL)})}),
            grid.get_node_ids()[0],
            "train",
        )
        (reply,) = grid.send_and_receive([message])
    assert reply.has_error()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "<class 'RuntimeError'>:<'partition 0 cannot train'>"
    assert reply.metadata.reply_to_message_id == message.metadata.message_id


def test_a_clientapp_that_returns_no_reply_is_a_failure():
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(msg.content, msg.metadata.src_node_id, "train")  # a new message, no reply

    grid = EmbeddedGrid(app, 1)
    with server_identity(grid.run.run_id):
        (reply,) = grid.send_and_receive([Message(RecordDict(), grid.get_node_ids()[0], "train")])
    assert reply.has_error()
    assert "reply_to" in reply.error.reason


def test_two_runs_are_bitwise_identical():
    def once() -> tuple[bytes, dict]:
        ledger = CommLedger()
        run = run_embedded(
            make_server_app(ledger, evaluate=True), make_client_app(), 3, {"rounds": 3}
        )
        return run.server_context.state["final"]["w"].numpy().tobytes(), ledger.totals()

    assert once() == once()


def test_ledger_counts_exactly_the_bytes_the_grid_transports(monkeypatch):
    transported: dict[str, int] = {}
    real_serialise = grid_module.serialise

    def spying_serialise(message: Message) -> grid_module.Packet:
        packet = real_serialise(message)
        transported[packet.message_id] = sum(len(b) for b in packet.objects.values())
        return packet

    monkeypatch.setattr(grid_module, "serialise", spying_serialise)
    ledger = CommLedger()
    run_embedded(make_server_app(ledger, evaluate=True), make_client_app(), 2, {"rounds": 2})
    # 2 rounds x (train + evaluate) x 2 nodes, both ways
    assert len(ledger.messages) == len(transported) == 16
    assert sorted(m.num_bytes for m in ledger.messages) == sorted(transported.values())
    summary = ledger.summary()
    assert {k for r in summary["rounds"] for k in r["by_kind"]} == {"train", "evaluate"}
    assert summary["totals"]["total_bytes"] == sum(transported.values())


def test_message_bytes_are_the_payload_plus_small_object_overhead():
    grid = EmbeddedGrid(ClientApp(), 1)
    weights = np.random.default_rng(0).normal(size=10_000).astype(np.float32)
    with server_identity(grid.run.run_id):
        message = Message(RecordDict({"arrays": ArrayRecord({"w": Array(weights)})}), 7, "train")
    size = message_bytes(message)
    proto = len(message_to_proto(message).SerializeToString())
    assert weights.nbytes < size.arrays < size.total
    assert proto <= size.total <= proto + 1024  # object ids and headers add a few hundred bytes


def test_full_model_bytes_from_shapes_equals_serialising_the_record():
    gen = torch.Generator().manual_seed(0)
    state = {
        "embed.weight": torch.randn(1400, 1000, generator=gen),  # 5.6 MB: two 5 MiB chunks
        "layers.0.attn.q.weight": torch.randn(16, 8, generator=gen),
        "layers.0.norm.weight": torch.randn(8, generator=gen),
        "scalar": torch.randn((), generator=gen),
        "nöt_ascii": torch.randn(2, 3, 4, generator=gen),
    }
    measured = record_bytes(ArrayRecord(state))
    assert full_model_bytes(state) == measured
    assert full_model_bytes({k: tuple(v.shape) for k, v in state.items()}) == measured
    on_meta = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    assert full_model_bytes(on_meta) == measured
    # Identical arrays travel once, so the shape-only figure is then an upper bound
    zeros = {"a": torch.zeros(64), "b": torch.zeros(64)}
    assert record_bytes(ArrayRecord(zeros)) < full_model_bytes(zeros)


def test_full_model_ratio_predicts_the_bytes_of_sending_the_full_model():
    """A run that sends part of the model, with the full model's size, predicts a full run."""
    gen = torch.Generator().manual_seed(1)
    full = {f"layer{i}.weight": torch.randn(32, 16, generator=gen) for i in range(6)}
    shared = {k: v for k, v in full.items() if k in ("layer0.weight", "layer3.weight")}

    def run_with(arrays: dict[str, torch.Tensor]) -> CommLedger:
        client = ClientApp()

        @client.train()
        def train(msg: Message, context: Context) -> Message:
            state = msg.content["arrays"].to_torch_state_dict()
            updated = ArrayRecord({k: v + 1 for k, v in state.items()})
            metrics = MetricRecord({"num-examples": 5})
            return Message(RecordDict({"arrays": updated, "metrics": metrics}), reply_to=msg)

        ledger = CommLedger()
        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            random.seed(0)
            strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
            strategy.start(
                grid=MeteredGrid(grid, ledger), initial_arrays=ArrayRecord(arrays), num_rounds=2
            )

        run_embedded(server, client, 2)
        return ledger

    partial = run_with(shared).summary(full_model_bytes=full_model_bytes(full))
    measured_full = run_with(full).totals()["total_bytes"]
    assert partial["full_model"]["equivalent_total_bytes"] == measured_full
    assert partial["full_model"]["ratio"] == pytest.approx(
        partial["totals"]["total_bytes"] / measured_full
    )
    assert 0.3 < partial["full_model"]["ratio"] < 0.4  # 2 of 6 equal-sized tensors


def test_grid_rejects_bad_input_with_clear_errors():
    with pytest.raises(GridError, match="one mapping per node"):
        EmbeddedGrid(ClientApp(), 2, node_configs=[{}])
    with pytest.raises(GridError, match="pass paths as str"):
        EmbeddedGrid(ClientApp(), 1, node_configs=[{"data-dir": object()}])
    grid = EmbeddedGrid(ClientApp(), 2)
    with server_identity(grid.run.run_id):
        stray = Message(RecordDict(), 12345, "train")
        with pytest.raises(GridError, match="not in this grid"):
            grid.send_and_receive([stray])


def test_node_ids_are_seeded_and_distinct():
    ids = EmbeddedGrid(ClientApp(), 5, seed=3).get_node_ids()
    assert ids == EmbeddedGrid(ClientApp(), 5, seed=3).get_node_ids()
    assert ids != EmbeddedGrid(ClientApp(), 5, seed=4).get_node_ids()
    assert len(set(ids)) == 5 and 1 not in ids  # 1 is the SuperLink's own node id


def test_flower_logs_are_coloured_only_on_a_terminal_and_follow_quiet(monkeypatch):
    import io
    import logging

    from flwr.common.logger import ConsoleHandler

    from flexmoe.runtime import console

    (handler,) = [h for h in logging.getLogger("flwr").handlers if isinstance(h, ConsoleHandler)]
    captured = io.StringIO()
    previous = handler.setStream(captured)

    def logged_by_a_run() -> str:
        captured.seek(0)
        captured.truncate(0)
        run_embedded(make_server_app(CommLedger()), make_client_app(), 2, {"rounds": 1})
        return captured.getvalue()

    try:
        monkeypatch.setattr(console, "_force_terminal", False)
        logged = logged_by_a_run()
        assert "INFO" in logged and "\x1b[" not in logged
        monkeypatch.setattr(console, "_force_terminal", True)
        assert "\x1b[" in logged_by_a_run()
        monkeypatch.setattr(console, "quiet", True)
        assert "INFO" not in logged_by_a_run()
    finally:
        handler.setStream(previous)
        monkeypatch.undo()
        grid_module.match_flower_logs()

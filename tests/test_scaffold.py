"""SCAFFOLD: update rules on hand-computed numbers; a grid run equal to a direct implementation."""

import functools
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flexmoe.federated.grid import run_embedded
from flexmoe.federated.scaffold import (
    CONTROL_DELTA_PREFIX,
    SERVER_CONTROL_PREFIX,
    Scaffold,
    ScaffoldError,
    control_correction,
    correct_gradients,
    load_client_control,
    reply_arrays,
    save_client_control,
    split_train_arrays,
    updated_client_control,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_client_rules_on_hand_computed_numbers():
    c_i, c, x, y = {"w": t(0.2, 0.0)}, {"w": t(1.0, -1.0)}, {"w": t(3.0, 1.0)}, {"w": t(2.0, 1.5)}
    # c_i+ = c_i - c + (x - y) / (K * lr) with K * lr = 5 * 0.1 = 0.5
    #      = [0.2 - 1 + 1 / 0.5, 0 + 1 - 0.5 / 0.5] = [1.2, 0.0]
    new = updated_client_control(c_i, c, x, y, num_steps=5, lr=0.1)
    torch.testing.assert_close(new["w"], t(1.2, 0.0))
    record = reply_arrays(y, c_i, new)
    assert sorted(record) == [CONTROL_DELTA_PREFIX + "w", "w"]
    np.testing.assert_allclose(record[CONTROL_DELTA_PREFIX + "w"].numpy(), [1.0, 0.0], atol=1e-6)

    # g + c - c_i: [0.3 + 1 - 0.2, -0.5 - 1 - 0] = [1.1, -1.5]; no gradient yet -> c - c_i
    params = {"w": torch.nn.Parameter(t(0.0, 0.0)), "unused": torch.nn.Parameter(t(0.0))}
    params["w"].grad = t(0.3, -0.5)
    correction = control_correction(
        {"w": t(1.0, -1.0), "unused": t(2.0)}, {"w": t(0.2, 0.0), "unused": t(0.5)}
    )
    correct_gradients(params, correction)
    torch.testing.assert_close(params["w"].grad, t(1.1, -1.5))
    torch.testing.assert_close(params["unused"].grad, t(1.5))


def test_client_control_lives_on_disk(tmp_path):
    like = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    path = tmp_path / "node" / "control.safetensors"
    first = load_client_control(path, like)
    assert all(torch.equal(first[k], torch.zeros_like(like[k])) for k in like)
    save_client_control(path, {"a": torch.full((2, 3), 0.5), "b": torch.arange(4.0)})
    again = load_client_control(path, like)
    torch.testing.assert_close(again["b"], torch.arange(4.0))
    with pytest.raises(ScaffoldError, match="different keys"):
        load_client_control(path, {"a": torch.ones(2, 3)})


# Server rule by hand. 4 clients (N = 4), partitions 2 and 3 fail, so |S| = 2; lr_g = 0.5.
# Round 1 (x = [1, 2], c = 0):  p0 sends y = [2, 2], dc = [1, 0]; p1 sends y = [0, 4], dc = [3, 2]
#   x <- x + 0.5 * mean([1, 0], [-1, 2]) = [1, 2.5];  c <- 0 + ([1, 0] + [3, 2]) / 4 = [1, 0.5]
# Round 2: p0 sends y = x + [2, -2], p1 sends y = x, both dc = 0
#   x <- [1, 2.5] + 0.5 * mean([2, -2], [0, 0]) = [1.5, 2.0];  c stays [1, 0.5]
REPLIES = {
    1: {0: ([2.0, 2.0], [1.0, 0.0]), 1: ([0.0, 4.0], [3.0, 2.0])},
    2: {0: ([3.0, 0.5], [0.0, 0.0]), 1: ([1.0, 2.5], [0.0, 0.0])},
}


def test_server_rule_on_hand_computed_numbers():
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition >= 2:
            raise RuntimeError("this client drops out")
        server_round = int(msg.content["config"]["server-round"])
        x, c = split_train_arrays(msg.content["arrays"])
        context.state[f"received-{server_round}"] = ArrayRecord({"x": x["w"], "c": c["w"]})
        y, delta = REPLIES[server_round][partition]
        arrays = ArrayRecord({"w": t(*y), CONTROL_DELTA_PREFIX + "w": t(*delta)})
        metrics = MetricRecord({"num-examples": 100 * (partition + 1)})  # ignored by SCAFFOLD
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(0)
        strategy = Scaffold(num_clients=4, server_lr=0.5, fraction_evaluate=0.0)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.array([1.0, 2.0], np.float32))}),
            num_rounds=2,
        )
        context.state["final"] = result.arrays
        context.state["control"] = ArrayRecord({"w": Array(strategy.control["w"])})

    run = run_embedded(server, client, 4, seed=1)
    state = run.server_context.state
    np.testing.assert_allclose(state["final"]["w"].numpy(), [1.5, 2.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(state["control"]["w"].numpy(), [1.0, 0.5], rtol=0, atol=1e-6)
    received = run.node_contexts[0].state["received-2"]
    np.testing.assert_allclose(received["x"].numpy(), [1.0, 2.5], rtol=0, atol=1e-6)
    np.testing.assert_allclose(received["c"].numpy(), [1.0, 0.5], rtol=0, atol=1e-6)
    first = run.node_contexts[1].state["received-1"]
    np.testing.assert_array_equal(first["c"].numpy(), [0.0, 0.0])


# Toy problem: client i minimises f_i(w) = a_i / 2 * ||w - m_i||^2. The minimiser of the mean
# objective is w* = sum(a_i m_i) / sum(a_i); FedAvg with several local steps drifts away from it.
CURVATURE = [1.0, 2.0, 4.0]
TARGETS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
LOCAL_STEPS, LR, SERVER_LR, ROUNDS = 5, 0.1, 1.0, 30
OPTIMUM = (np.array(CURVATURE)[:, None] * TARGETS).sum(0) / sum(CURVATURE)


def direct_scaffold(with_control: bool) -> tuple[np.ndarray, np.ndarray]:
    """The algorithm written out in float64 (with_control=False is FedAvg with equal weights)."""
    n = len(CURVATURE)
    x, c = np.zeros(2), np.zeros(2)
    c_clients = np.zeros((n, 2))
    for _ in range(ROUNDS):
        ys, deltas = [], []
        for i in range(n):
            y = x.copy()
            for _ in range(LOCAL_STEPS):
                g = CURVATURE[i] * (y - TARGETS[i])
                y = y - LR * (g + (c - c_clients[i] if with_control else 0))
            new_c = c_clients[i] - c + (x - y) / (LOCAL_STEPS * LR)
            ys.append(y)
            deltas.append(new_c - c_clients[i])
            c_clients[i] = new_c
        x = x + SERVER_LR * np.mean([y - x for y in ys], axis=0)
        c = c + np.sum(deltas, axis=0) / n
    return x, c


def quadratic_client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        x, c = split_train_arrays(msg.content["arrays"])
        path = str(context.node_config["control-path"])
        c_i = load_client_control(path, like=x)
        params = {"w": torch.nn.Parameter(x["w"].clone())}
        optimizer = torch.optim.SGD(params.values(), lr=LR)
        hook = functools.partial(correct_gradients, correction=control_correction(c, c_i))
        target = torch.tensor(TARGETS[i], dtype=torch.float32)
        for _ in range(LOCAL_STEPS):
            optimizer.zero_grad()
            loss = CURVATURE[i] / 2 * ((params["w"] - target) ** 2).sum()
            loss.backward()
            hook(params)
            optimizer.step()
        new_c_i = updated_client_control(c_i, c, x, params, LOCAL_STEPS, LR)
        save_client_control(path, new_c_i)
        content = RecordDict(
            {
                "arrays": reply_arrays(params, c_i, new_c_i),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def test_scaffold_over_the_grid_matches_a_direct_implementation_and_removes_drift(tmp_path):
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(0)
        strategy = Scaffold(num_clients=3, server_lr=SERVER_LR, fraction_evaluate=0.0)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
            num_rounds=ROUNDS,
        )
        context.state["final"] = result.arrays
        context.state["control"] = ArrayRecord({"w": Array(strategy.control["w"])})

    node_configs = [
        {"control-path": str(tmp_path / f"node{i}" / "c.safetensors")} for i in range(3)
    ]
    run = run_embedded(server, quadratic_client_app(), 3, node_configs=node_configs)
    x_grid = run.server_context.state["final"]["w"].numpy()
    c_grid = run.server_context.state["control"]["w"].numpy()

    x_direct, c_direct = direct_scaffold(with_control=True)
    np.testing.assert_allclose(x_grid, x_direct, rtol=0, atol=1e-5)
    np.testing.assert_allclose(c_grid, c_direct, rtol=0, atol=1e-5)
    # SCAFFOLD reaches the optimum of the mean objective; FedAvg's local steps drift away from it
    assert np.abs(x_direct - OPTIMUM).max() < 1e-4
    x_fedavg, _ = direct_scaffold(with_control=False)
    assert np.abs(x_fedavg - OPTIMUM).max() > 0.05


def test_replies_without_control_deltas_are_a_clear_error():
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        x, _ = split_train_arrays(msg.content["arrays"])
        content = RecordDict(
            {"arrays": ArrayRecord(x), "metrics": MetricRecord({"num-examples": 1})}
        )
        return Message(content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        Scaffold(num_clients=2, fraction_evaluate=0.0).start(
            grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(2, np.float32))})
        )

    with pytest.raises(ScaffoldError, match="control delta"):
        run_embedded(server, client, 2)


def test_server_message_carries_x_and_c_under_their_prefixes():
    record = ArrayRecord({"w": t(1.0), SERVER_CONTROL_PREFIX + "w": t(0.5)})
    x, c = split_train_arrays(record)
    assert list(x) == list(c) == ["w"]
    with pytest.raises(ScaffoldError, match="different keys"):
        split_train_arrays(ArrayRecord({"w": t(1.0)}))

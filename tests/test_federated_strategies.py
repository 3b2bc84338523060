"""The server optimisers as `make_strategy` builds them (paper hyper-parameters), driven by the
real round loop, against their update rules worked out by hand on a two-client example."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flexmoe.federated.comm import CommLedger
from flexmoe.federated.config import ServerConfig
from flexmoe.federated.grid import run_embedded
from flexmoe.federated.server_loop import RoundLoop
from flexmoe.federated.strategies import make_strategy

# Two clients with 1 and 3 examples; global x0 = [1, 2]. Each client replies with what it
# received plus an offset, so the sample-weighted mean update of round t is
#   D1 = (1 * [1, 0] + 3 * [0, 4]) / 4 = [0.25, 3]    D2 = (1 * [2, -4] + 3 * [0, 0]) / 4 = [0.5, -1]
X0 = [1.0, 2.0]
WEIGHTS = {0: 1, 1: 3}
OFFSETS = {1: {0: [1.0, 0.0], 1: [0.0, 4.0]}, 2: {0: [2.0, -4.0], 1: [0.0, 0.0]}}

# Paper values (ServerConfig defaults): momentum 0.9 (server lr 1); eta 1e-3, tau 1e-3,
# beta_1 0.9, beta_2 0.99. Rules as Flower implements them (Reddi et al. 2021, v_0 = 0, m_0 = 0):
#   m_t = b1 m + (1 - b1) D_t;   x_t = x + eta_t m_t / (sqrt(v_t) + tau)
EXPECTED = {
    # FedAvgM: p_t = x - mean(y) = -D_t; u_1 = p_1, u_t = 0.9 u + p_t; x_t = x - u_t
    #   x1 = [1, 2] + [0.25, 3] = [1.25, 5]
    #   u2 = 0.9 * [-0.25, -3] + [-0.5, 1] = [-0.725, -1.7];  x2 = [1.25, 5] - u2 = [1.975, 6.7]
    "fedavgm": ([1.25, 5.0], [1.975, 6.7]),
    # FedAdagrad (b1 = 0): v_t = v + D_t^2
    #   x1 = x0 + 1e-3 * [0.25 / 0.251, 3 / 3.001] = [1.000996016, 2.000999667]
    #   v2 = [0.3125, 10]: x2 = x1 + 1e-3 * [0.5 / 0.560017, -1 / 3.163278]
    "fedadagrad": ([1.000996016, 2.000999667], [1.001888846, 2.000683539]),
    # FedYogi: v_t = v - (1 - b2) D^2 sign(v - D^2)
    #   m1 = [0.025, 0.3], v1 = [0.000625, 0.09]: x1 = x0 + 1e-3 * [0.025/0.026, 0.3/0.301]
    #   m2 = [0.0725, 0.17], v2 = v1 + 0.01 * [0.25, 1] = [0.003125, 0.1]
    "fedyogi": ([1.000961538, 2.000996678], [1.002235666, 2.001532570]),
    # FedAdam: v_t = b2 v + (1 - b2) D^2, with Flower's bias-corrected step
    #   eta_t = eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)): 7.4246e-4 (t = 1), 6.3594e-4 (t = 2)
    #   x1 = x0 + 7.4246e-4 * [0.025/0.026, 0.3/0.301]
    #   v2 = 0.99 * v1 + 0.01 * [0.25, 1] = [0.00311875, 0.0991]
    "fedadam": ([1.000713904, 2.000739993], [1.001524970, 2.001082328]),
}


def client() -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"config": ConfigRecord({"partition-id": pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        x = msg.content["arrays"]["w"].numpy()
        context.state[f"received-{server_round}"] = ArrayRecord({"w": Array(x)})
        y = x + np.array(OFFSETS[server_round][pid], np.float32)
        content = {
            "arrays": ArrayRecord({"w": Array(y)}),
            "metrics": MetricRecord({"num-examples": WEIGHTS[pid]}),
        }
        return Message(RecordDict(content), reply_to=msg)

    return app


def run_rounds(name: str, run_dir) -> tuple[np.ndarray, np.ndarray]:
    """x1 (as the clients received it in round 2) and x2 (the loop's final global arrays)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        loop = RoundLoop(
            grid=grid,
            strategy=make_strategy(name, ServerConfig(), num_clients=2),
            run_dir=run_dir,
            rounds=2,
            fraction=1.0,
            min_successful=1,
            seed=0,
            train_config=lambda r: ConfigRecord({"server-round": r}),
            reply_shapes=lambda arrays: {k: v.shape for k, v in arrays.items()},
            ledger=CommLedger(),
        )
        final = loop.run({"w": np.array(X0, np.float32)})
        context.state["final"] = ArrayRecord({"w": Array(final["w"])})

    run = run_embedded(server, client(), 2)
    x1 = run.node_contexts[0].state["received-2"]["w"].numpy()
    x2 = run.server_context.state["final"]["w"].numpy()
    return x1, x2


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_server_optimiser_matches_its_update_rule(name, tmp_path):
    x1, x2 = run_rounds(name, tmp_path)
    expected_1, expected_2 = EXPECTED[name]
    np.testing.assert_allclose(x1, expected_1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(x2, expected_2, rtol=0, atol=1e-6)
    # the global arrays keep the model's dtype (Flower's FedAdam computes in float64)
    assert x1.dtype == x2.dtype == np.float32


def test_paper_hyper_parameters_reach_the_strategies():
    server = ServerConfig()
    assert make_strategy("fedavgm", server, 4).server_momentum == 0.9
    assert make_strategy("fedprox", server, 4).proximal_mu == 0.01
    for name in ("fedadagrad", "fedyogi", "fedadam"):
        strategy = make_strategy(name, server, 4)
        assert (strategy.eta, strategy.tau) == (1e-3, 1e-3)
    for name in ("fedyogi", "fedadam"):
        strategy = make_strategy(name, server, 4)
        assert (strategy.beta_1, strategy.beta_2) == (0.9, 0.99)
    assert make_strategy("scaffold", server, 4).num_clients == 4
    with pytest.raises(ValueError, match="no strategy named"):
        make_strategy("fedsgd", server, 4)

"""Server strategies by name: Flower's own where they exist, flexmoe's SCAFFOLD where not.

flexmoe samples clients itself (seeded, over partition ids, so runs are reproducible across
runtimes), so every strategy is built with fraction 1.0 over the nodes it is handed.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)

from flexmoe.federated.config import ServerConfig


def make_strategy(name: str, server: ServerConfig, num_clients: int) -> Strategy:
    """Build the strategy `name` with the paper's hyper-parameters from `server`."""
    sampling = dict(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    adaptive = dict(eta=server.server_lr, tau=server.tau)
    if name == "fedavg":
        return FedAvg(**sampling)
    if name == "fedprox":
        return FedProx(**sampling, proximal_mu=server.fedprox_mu)
    if name == "fedavgm":
        return FedAvgM(**sampling, server_momentum=server.server_momentum)
    if name == "fedadagrad":
        return FedAdagrad(**sampling, **adaptive)
    if name == "fedyogi":
        return FedYogi(**sampling, **adaptive, beta_1=server.beta_1, beta_2=server.beta_2)
    if name == "fedadam":
        return FedAdam(**sampling, **adaptive, beta_1=server.beta_1, beta_2=server.beta_2)
    if name == "scaffold":
        from flexmoe.federated.scaffold import Scaffold

        return Scaffold(**sampling, server_lr=server.scaffold_server_lr, num_clients=num_clients)
    raise ValueError(f"no strategy named {name!r}")

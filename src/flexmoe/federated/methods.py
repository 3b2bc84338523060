"""The methods `flexmoe run` compares: FLEx, its ablations, and the paper's baselines.

Every method is the same federated loop with three choices:
- what a client trains: `shared` parameters only (the sharing policy) or `all` parameters
  (the paper's naive "MoE + X" regime, experts and routers included);
- what travels: the trained non-personal parameters, or nothing (`local`);
- whether each client grafts a personal expert (FLEx), and with which options;
plus the server strategy that aggregates what travels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexmoe.config import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    trains: str
    """`shared`: the sharing policy's parameters (+ the graft); `all`: every parameter."""
    strategy: str
    """Server aggregation: fedavg | fedprox | fedavgm | fedadagrad | fedyogi | fedadam | scaffold | none."""
    graft: bool = False
    flex_overrides: dict = field(default_factory=dict)
    """Changes to the run's FlexConfig (ablations)."""

    @property
    def aggregates(self) -> bool:
        return self.strategy != "none"


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "flex",
            "FLEx: shared layers aggregated, grafted expert + gate kept local",
            "shared",
            "fedavg",
            graft=True,
        ),
        Method("fedavg", "MoE + FedAvg: everything trained and averaged", "all", "fedavg"),
        Method("fedprox", "MoE + FedProx (mu 0.01)", "all", "fedprox"),
        Method("scaffold", "MoE + SCAFFOLD (control variates)", "all", "scaffold"),
        Method("fedavgm", "MoE + FedAvgM (server momentum 0.9)", "all", "fedavgm"),
        Method("fedadagrad", "MoE + FedAdagrad", "all", "fedadagrad"),
        Method("fedyogi", "MoE + FedYogi", "all", "fedyogi"),
        Method("fedadam", "MoE + FedAdam", "all", "fedadam"),
        Method("local", "each client trains alone, nothing aggregated", "all", "none"),
        Method(
            "fedit",
            "federated shared layers only, no graft (FLEx minus grafting)",
            "shared",
            "fedavg",
        ),
        Method(
            "flex-nogate",
            "FLEx ablation: grafted expert without gate",
            "shared",
            "fedavg",
            graft=True,
            flex_overrides={"gate": "none"},
        ),
        Method(
            "flex-random-expert",
            "FLEx ablation: a random expert is grafted",
            "shared",
            "fedavg",
            graft=True,
            flex_overrides={"strategy": "random"},
        ),
        Method(
            "flex-r2",
            "FLEx ablation: two grafted experts per layer",
            "shared",
            "fedavg",
            graft=True,
            flex_overrides={"r": 2},
        ),
    ]
}


def resolve_methods(names: list[str] | tuple[str, ...]) -> list[Method]:
    """Method names (or `all`) to Method objects, with a clear error for unknown names."""
    if list(names) == ["all"]:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)} or 'all'"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"a method is listed twice in {', '.join(names)}")
    return [METHODS[n] for n in names]

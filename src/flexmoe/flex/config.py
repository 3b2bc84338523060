"""FLEx options: how experts are selected and how the grafted expert is attached and trained.

One dataclass, validated on construction, so a wrong value fails where it is written (a config
file or `--set`) with a message naming the allowed values, not deep inside selection or training.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexmoe.config import ConfigError

STRATEGIES = ("reconstruction", "random", "most-routed")
"""reconstruction: the paper's argmin of ||Z - Z_e||_F; "random" and "most-routed" (ESFT-style)
are ablations."""

GATES = ("sigmoid", "zero-init", "none")
"""sigmoid: the paper's gate; zero-init: sigmoid gate times a scalar initialised to 0 (the grafted
model starts as exactly the base model); none: no gate (the paper's collapse ablation)."""

REGIMES = ("full", "lora")
"""full: the grafted copy itself trains; lora: the copy stays frozen and LoRA on it trains."""


@dataclass
class FlexConfig:
    """Options of expert grafting (selection, gate, training regime of the graft)."""

    strategy: str = "reconstruction"
    r: int = 1
    """Number of experts grafted per MoE layer (the paper uses 1; r > 1 is its ablation)."""
    calibration_samples: int = 32
    """Local examples used to score experts (selection runs once, before federated training)."""
    calibration_max_length: int = 512
    """Token length calibration examples are truncated to."""
    gate: str = "sigmoid"
    """How the grafted expert's output is mixed in, see GATES."""
    regime: str = "full"
    """What of the graft trains, see REGIMES."""
    lora_r: int = 8
    """LoRA rank on the graft's Linear layers (regime "lora" only), likewise alpha and dropout."""
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    seed: int = 0
    """Seeds the "random" strategy (selection is otherwise deterministic)."""

    def __post_init__(self) -> None:
        _require_choice("strategy", self.strategy, STRATEGIES)
        _require_choice("gate", self.gate, GATES)
        _require_choice("regime", self.regime, REGIMES)
        positive = ("r", "calibration_samples", "calibration_max_length", "lora_r", "lora_alpha")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"flex.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.lora_dropout, int | float) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"flex.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"flex.seed must be an integer, got {self.seed!r}")


def _require_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"flex.{name} must be one of {', '.join(allowed)}; got {value!r}")

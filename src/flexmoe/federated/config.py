"""Options of a federated run (`flexmoe run`), with the paper's setting and the tiny demo as presets.

Resolution order: preset < config file < command-line flags < `--set key=value`. The resolved
configuration is written into the run directory and hashed, so a run is reproducible from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from flexmoe.config import ConfigError
from flexmoe.federated.methods import resolve_methods
from flexmoe.flex.config import FlexConfig

MIN_PROMPT_LENGTH = 48
"""Prompt tokens an evaluation prompt needs at least: the Alpaca template alone takes ~40."""


@dataclass
class DataConfig:
    source: str = "dolly"
    """A bundled set name (dolly, alpaca, ...), a local JSON/JSONL/CSV/Parquet file, or a hub id."""
    partition: str = "pathological"
    """pathological | dirichlet | domain | iid | natural."""
    categories: tuple[str, ...] = ()
    """pathological: the category of each client, in client order. Empty: the paper's four Dolly
    tasks when the data has them, else the data's `clients` largest categories."""
    clients: int = 4
    """Number of clients (pathological: one per category; ignored when `categories` are named)."""
    alpha: float = 0.5
    """dirichlet: concentration over categories (smaller = more skewed)."""
    test_per_client: int = 100
    """Held-out test items per client, drawn from its own distribution (paper: 100 per task)."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Local files with other column names: our field -> their column."""


@dataclass
class TrainConfig:
    rounds: int = 50
    local_steps: int = 5
    batch_size: int = 4
    lr: float = 4e-5
    """Peak client learning rate; cosine-decayed across rounds down to `min_lr` (paper: 4e-5)."""
    min_lr: float = 1e-6
    max_length: int = 512
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    fraction_train: float = 1.0
    """Fraction of clients sampled each round (paper: all 4)."""
    min_successful_clients: int = 1
    """A round whose valid replies are fewer than this keeps the previous global state."""


@dataclass
class ServerConfig:
    """Strategy hyper-parameters (paper values)."""

    fedprox_mu: float = 0.01
    server_momentum: float = 0.9
    server_lr: float = 1e-3
    """FedAdagrad/FedYogi/FedAdam server learning rate (eta)."""
    tau: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.99
    scaffold_server_lr: float = 1.0


EVAL_METRICS = ("rouge", "mmlu", "ppl", "routing", "cost")
"""What `flexmoe evaluate` measures (ROUGE is also measured by every run)."""


@dataclass
class EvalConfig:
    samples: int = 100
    """Test items evaluated per client (at most its test split)."""
    max_new_tokens: int = 256
    batch_size: int = 8
    metrics: tuple[str, ...] = ("rouge",)
    """Evaluated at the end of the run: any of EVAL_METRICS."""
    drift_samples: int = 8
    """Test prompts (the first ones of its split) on which every client measures, after each
    round's training, how far its routing has drifted from the base model's; 0: not measured."""


@dataclass
class RunConfig:
    model: str = "default"
    """`default` (the built-in tiny MoE, built on first use), a hub id or a local model directory."""
    methods: tuple[str, ...] = ("flex", "fedavg", "fedavgm", "local")
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    sharing: str = "attention"
    """What FLEx and fedit aggregate: attention | non_expert | lora."""
    include_shared_expert: bool = False
    """non_expert sharing: also train and aggregate the always-on shared expert."""
    shared_lora_r: int = 32
    """lora sharing: LoRA rank on the attention projections (paper: r 32, alpha 64, dropout 0.05)."""
    shared_lora_alpha: int = 64
    shared_lora_dropout: float = 0.05
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    flex: FlexConfig = field(default_factory=FlexConfig)

    def __post_init__(self) -> None:
        if self.train.rounds < 1 or self.train.local_steps < 1 or self.train.batch_size < 1:
            raise ConfigError("train.rounds, train.local_steps and train.batch_size must be >= 1")
        if not 0 < self.train.fraction_train <= 1:
            raise ConfigError("train.fraction_train must be in (0, 1]")
        resolve_methods(self.methods)
        if self.train.min_successful_clients < 1:
            raise ConfigError("train.min_successful_clients must be >= 1")
        unknown = [m for m in self.eval.metrics if m not in EVAL_METRICS]
        if unknown:
            raise ConfigError(
                f"unknown eval.metrics {', '.join(unknown)}: choose from {', '.join(EVAL_METRICS)}"
            )
        if self.eval.drift_samples < 0:
            raise ConfigError("eval.drift_samples must be >= 0 (0: routing drift not measured)")
        if self.prompt_length < MIN_PROMPT_LENGTH:
            raise ConfigError(
                f"train.max_length={self.train.max_length} minus eval.max_new_tokens="
                f"{self.eval.max_new_tokens} leaves {self.prompt_length} prompt tokens at "
                f"evaluation (need >= {MIN_PROMPT_LENGTH}): lower --max-new-tokens or raise "
                "--set train.max_length"
            )

    @property
    def prompt_length(self) -> int:
        """Prompt tokens at evaluation: the context length minus the tokens generated."""
        return self.train.max_length - self.eval.max_new_tokens

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def hash(self) -> str:
        """sha256 of the resolved configuration (recorded in the run directory and results)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


PRESETS: dict[str, dict] = {
    # The paper's setting (Qwen1.5-MoE-A2.7B on Dolly): the defaults of the dataclasses above.
    "paper": {},
    # The built-in tiny MoE on this 2-core CPU: the same protocol, scaled to finish in minutes.
    "tiny": {
        "train": {
            "rounds": 10,
            "local_steps": 5,
            "batch_size": 8,
            "lr": 5e-4,
            "min_lr": 5e-5,
            "max_length": 320,
        },
        "data": {"test_per_client": 100},
        "eval": {"samples": 40, "max_new_tokens": 48, "batch_size": 20},
        "flex": {"calibration_samples": 32, "calibration_max_length": 256},
    },
}

"""Training-step cost of the graft: grafted vs base model, side by side in one process.

Model: the Qwen1.5-MoE-shaped model of `selection_speed.py` (60 experts, top-4, a 4x-wide gated
shared expert; hidden 256, expert width 128, 2 MoE layers). A step is forward + backward + AdamW
on batch 8 x 128 tokens with FLEx's freezing (`freeze_for(model, "attention")`: experts and
routers frozen, attention trainable; on the grafted model the graft and its gate train too).
The grafted model adds one expert per token and layer (k + 1 = 5 routed-width experts). Steps of
the models alternate so that load from other processes hits both alike; the median is reported.

Run: `python benchmarks/graft_step_time.py` -> graft_step_time.json and graft_step_time.md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from selection_speed import calibration_batches, qwen15_shaped_model

from flexmoe.flex import FlexConfig, graft, select_experts
from flexmoe.moe.roles import freeze_for
from flexmoe.runtime import configure_threads

HERE = Path(__file__).parent
BATCH, LENGTH = 8, 128
WARMUP, STEPS = 2, 12
TARGET_RATIO = 1.15


class Trainer:
    """One model with its optimiser over the FLEx-trainable parameters."""

    def __init__(self, model: torch.nn.Module) -> None:
        freeze_for(model, "attention")
        self.model = model.train()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(3, 1024, (BATCH, LENGTH), generator=generator)
        self.seconds: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def grafted_model(regime: str) -> torch.nn.Module:
    model = qwen15_shaped_model()
    cfg = FlexConfig(regime=regime, calibration_samples=8, calibration_max_length=128)
    graft(model, select_experts(model, calibration_batches(), cfg), cfg)
    return model


def main() -> None:
    configure_threads(1)
    trainers = {
        "base": Trainer(qwen15_shaped_model()),
        "graft (full)": Trainer(grafted_model("full")),
        "graft (lora r=8)": Trainer(grafted_model("lora")),
    }
    for _ in range(WARMUP):
        for trainer in trainers.values():
            trainer.step()
    for _ in range(STEPS):
        for trainer in trainers.values():
            trainer.seconds.append(trainer.step())
    median = {name: statistics.median(t.seconds) for name, t in trainers.items()}
    ratios = {name: median[name] / median["base"] for name in trainers}
    report = {
        "model": "Qwen1.5-MoE-shaped: 60 experts, top-4, shared expert 4x, hidden 256, expert 128",
        "batch": [BATCH, LENGTH],
        "threads": 1,
        "steps": STEPS,
        "trainable_parameters": {
            name: sum(p.numel() for p in t.trainable) for name, t in trainers.items()
        },
        "seconds": {name: t.seconds for name, t in trainers.items()},
        "median_seconds": median,
        "ratio_to_base": {name: round(ratio, 3) for name, ratio in ratios.items()},
        "target_ratio": TARGET_RATIO,
    }
    (HERE / "graft_step_time.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Training step: grafted vs base model",
        "",
        f"{report['model']}; 2 MoE layers, batch {BATCH} x {LENGTH} tokens, forward + backward + "
        f"AdamW, experts and routers frozen, 1 thread, median of {STEPS} alternating steps "
        "(`benchmarks/graft_step_time.py`).",
        "",
        "| model | trainable params | step (s) | ratio to base |",
        "|---|---|---|---|",
    ]
    for name in trainers:
        lines.append(
            f"| {name} | {report['trainable_parameters'][name]:,} | {median[name]:.3f} | "
            f"{ratios[name]:.3f} |"
        )
    lines += ["", f"Target: ratio <= {TARGET_RATIO}."]
    (HERE / "graft_step_time.md").write_text("\n".join(lines) + "\n")
    for name in trainers:
        print(f"{name}: {median[name]:.3f}s per step, {ratios[name]:.3f}x base")
    print(f"target: <= {TARGET_RATIO}x")


if __name__ == "__main__":
    main()

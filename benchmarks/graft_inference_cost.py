"""Inference cost of FLEx's grafted expert (the k+1th expert): FLOPs per token and latency.

1. FLOPs per token of published MoE models, base vs grafted (one expert + sigmoid gate per MoE
   layer), from their published configs on the `meta` device (nothing downloaded or allocated);
   counted by `flexmoe.evaluation.cost.active_params_per_token` (2 x active parameters, lm_head
   matmul included, input embedding lookup and attention's context-length terms excluded).
2. Measured greedy-generation latency, base vs grafted, on the Qwen1.5-MoE-shaped model of
   `selection_speed.py` (60 experts, top-4, gated shared expert; hidden 256, 2 MoE layers):
   `inference_cost` alternates the two models within each repeat and reports the median ratio.

Run: `python benchmarks/graft_inference_cost.py` -> graft_inference_cost.json and .md.
"""

from __future__ import annotations

import json
from pathlib import Path

from param_share import PUBLISHED, build_on_meta
from selection_speed import calibration_batches, qwen15_shaped_model

from flexmoe.data import corpus_documents
from flexmoe.evaluation.cost import active_params_per_token, inference_cost
from flexmoe.flex import FlexConfig, LayerSelection, graft, select_experts
from flexmoe.models.tokenizer import train_tokenizer
from flexmoe.moe import find_moe_layers
from flexmoe.runtime import configure_threads

HERE = Path(__file__).parent
NEW_TOKENS, REPEATS = 32, 7
PROMPTS = [
    "The history of the city begins",
    "In 1998, the band released",
    "The species is found in",
    "After the war, he returned to",
    "The game was developed by",
    "The river flows through",
    "She was born in",
    "The album received",
]


def published_flops() -> list[dict]:
    """Active parameters and FLOPs per token of each published model, base and grafted."""
    rows = []
    for name, config in PUBLISHED.items():
        model = build_on_meta(config)
        base = active_params_per_token(model)
        # Which expert is grafted does not change the count: all experts of a layer are alike.
        selections = {
            layer.layer_index: LayerSelection(
                layer.layer_index, [0], "random", "random", [], [], "none", 0
            )
            for layer in find_moe_layers(model)
        }
        graft(model, selections, FlexConfig())
        grafted = active_params_per_token(model)
        rows.append(
            {
                "model": name,
                "total_params": base["total_params"],
                "base_active_params": base["active_params"],
                "grafted_active_params": grafted["active_params"],
                "flops_ratio": grafted["flops_per_token"] / base["flops_per_token"],
            }
        )
    return rows


def measured_latency() -> dict[str, dict]:
    """Generation latency, base vs grafted, with 1 prompt and with 8 prompts per batch."""
    tokenizer = train_tokenizer(corpus_documents("heldout")[:20], 1024)  # the model's vocab
    grafted = qwen15_shaped_model()
    cfg = FlexConfig(calibration_samples=8, calibration_max_length=128)
    graft(grafted, select_experts(grafted, calibration_batches(), cfg), cfg)
    return {
        f"batch {len(prompts)}": inference_cost(
            None, grafted, tokenizer, prompts, max_new_tokens=NEW_TOKENS, repeats=REPEATS
        )
        for prompts in (PROMPTS[:1], PROMPTS)
    }


def main() -> None:
    configure_threads(1)
    flops = published_flops()
    latency = measured_latency()
    report = {
        "flops": flops,
        "latency_model": "Qwen1.5-MoE-shaped: 60 experts, top-4, shared expert 4x, hidden 256, "
        "expert 128, 2 MoE layers",
        "latency": latency,
    }
    (HERE / "graft_inference_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Inference cost of the grafted expert",
        "",
        "FLOPs per token = 2 x active parameters (attention, routers, top-k routed experts, shared "
        "experts, lm_head; + grafted expert and gate), published configs, one grafted expert per "
        "MoE layer (`benchmarks/graft_inference_cost.py`).",
        "",
        "| model | total params | active params (base) | active params (grafted) | FLOPs ratio |",
        "|---|---|---|---|---|",
    ]
    for row in flops:
        lines.append(
            f"| {row['model']} | {row['total_params'] / 1e9:.2f}B | "
            f"{row['base_active_params'] / 1e9:.3f}B | {row['grafted_active_params'] / 1e9:.3f}B "
            f"| {row['flops_ratio']:.3f} |"
        )
    lines += [
        "",
        f"Greedy generation of {NEW_TOKENS} tokens, {report['latency_model']}, 1 thread, median "
        f"of {REPEATS} alternating repeats:",
        "",
        "| prompts per batch | base (s) | grafted (s) | latency ratio | FLOPs ratio |",
        "|---|---|---|---|---|",
    ]
    for name, result in latency.items():
        timing = result["latency"]
        lines.append(
            f"| {timing['prompts']} | {timing['base_seconds']:.3f} | "
            f"{timing['grafted_seconds']:.3f} | {timing['ratio']:.3f} | "
            f"{result['flops_ratio']:.3f} |"
        )
        print(
            f"{name}: latency ratio {timing['ratio']:.3f}, FLOPs ratio {result['flops_ratio']:.3f}"
        )
    (HERE / "graft_inference_cost.md").write_text("\n".join(lines) + "\n")
    for row in flops:
        print(f"{row['model']}: FLOPs ratio {row['flops_ratio']:.3f}")


if __name__ == "__main__":
    main()

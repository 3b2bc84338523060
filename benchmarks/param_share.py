"""What a FLEx round ships, per published MoE model: parameter share of every role.

Builds each model from its published config values (written below; nothing is downloaded) on the
`meta` device, so no memory is allocated, runs `role_table` and the sharing policies, and reports
the bytes one FLEx round sends per client and direction (attention policy, non-expert policy,
LoRA r=32 on attention) as a fraction of a full-model round (MoE + FedAvg ships every weight),
plus the size of one grafted expert per MoE layer (expert weights + a one-output gate).

Run: `python benchmarks/param_share.py` -> param_share.json and param_share.md next to this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from flexmoe.moe import find_moe_layers
from flexmoe.moe.roles import (
    Role,
    SharingPolicy,
    attention_linear_names,
    role_table,
    shared_parameter_names,
)

HERE = Path(__file__).parent
LORA_RANK = 32  # the FLEx paper's LoRA setting (r=32, alpha=64, on attention)
TABLE_ROLES = (
    Role.ROUTED_EXPERT,
    Role.ROUTER,
    Role.SHARED_EXPERT,
    Role.ATTENTION,
    Role.NORM,
    Role.EMBEDDING,
    Role.DENSE_MLP,
)

# Published config values (config.json of each hub repo), only the fields that shape parameters.
PUBLISHED = {
    "Qwen/Qwen1.5-MoE-A2.7B": Qwen2MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        norm_topk_prob=False,
        tie_word_embeddings=False,
    ),
    "allenai/OLMoE-1B-7B-0924": OlmoeConfig(
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        tie_word_embeddings=False,
    ),
    "mistralai/Mixtral-8x7B-v0.1": MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen3-30B-A3B": Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
    "deepseek-ai/DeepSeek-V2-Lite": DeepseekV2Config(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        moe_intermediate_size=1408,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        topk_method="greedy",
        tie_word_embeddings=False,
    ),
}
# Routed-expert share of the model quoted in docs/NOTES_TRANSFORMERS_MOE.md, to cross-check.
EXPECTED_EXPERT_SHARE = {
    "Qwen/Qwen1.5-MoE-A2.7B": 0.870,
    "allenai/OLMoE-1B-7B-0924": 0.931,
    "mistralai/Mixtral-8x7B-v0.1": 0.966,
    "Qwen/Qwen3-30B-A3B": 0.950,
}


def build_on_meta(config) -> torch.nn.Module:
    """The model with bf16 parameters on the meta device: shapes and dtypes, no storage."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def numel_of(model: torch.nn.Module, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in names)


def grafted_expert_numel(model: torch.nn.Module) -> int:
    """One copy of one routed expert per MoE layer, plus its one-output gate (H weights)."""
    total = 0
    for layer in find_moe_layers(model):
        weights = layer.expert_weights(0)
        total += sum(t.numel() for t in weights.values() if t is not None) + layer.hidden_size
    return total


def lora_numel(model: torch.nn.Module) -> int:
    """LoRA r=32 adapters on every attention projection (what the 'lora' policy ships)."""
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=attention_linear_names(model)
    )
    peft_model = get_peft_model(model, config)
    return numel_of(peft_model, shared_parameter_names(peft_model, "lora"))


def measure(hub_id: str, config) -> dict:
    model = build_on_meta(config)
    table = role_table(model)
    total = sum(stats.numel for stats in table.values())
    policies = {
        "attention": shared_parameter_names(model, "attention"),
        "non_expert": shared_parameter_names(model, "non_expert"),
        "non_expert+shared_expert": shared_parameter_names(
            model, SharingPolicy("non_expert", include_shared_expert=True)
        ),
    }
    shipped = {policy: numel_of(model, names) for policy, names in policies.items()}
    graft = grafted_expert_numel(model)
    shipped[f"lora_r{LORA_RANK}_attention"] = lora_numel(model)  # wraps the model: measure last
    return {
        "model": hub_id,
        "total_params": total,
        "bytes_bf16": 2 * total,
        "roles": {role.value: table[role].numel / total for role in Role if table[role].count},
        "round_fraction": {policy: n / total for policy, n in shipped.items()},
        "round_bytes_bf16": {policy: 2 * n for policy, n in shipped.items()},
        "grafted_expert_per_layer_fraction": graft / total,
        "expected_routed_expert_share": EXPECTED_EXPERT_SHARE.get(hub_id),
    }


def percent(value: float | None) -> str:
    if not value:
        return "-"
    return f"{100 * value:.3f}%" if value < 0.001 else f"{100 * value:.2f}%"


def markdown(results: list[dict]) -> str:
    lines = [
        "# Parameter share per role and bytes per FLEx round (published configs, bf16)",
        "",
        "Shares of the whole model (`benchmarks/param_share.py`, built on the meta device). "
        "A full-model round (MoE + FedAvg) ships 100% per client and direction; a FLEx round "
        "ships only its policy's shared parameters: `attention`, `non-expert` (attention, norms, "
        "embeddings, lm_head, dense-layer MLPs; shared experts not included), `LoRA` (r=32 on "
        "every attention projection). `graft` = one routed expert + its one-output gate per MoE "
        "layer, kept on the client.",
        "",
        "| model | params | routed experts | router | shared expert | attention | norm | "
        "embedding | dense MLP | round: attention | round: non-expert | round: LoRA | graft |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        roles, rounds = r["roles"], r["round_fraction"]
        cells = [
            r["model"],
            f"{r['total_params'] / 1e9:.2f}B",
            *(percent(roles.get(role.value)) for role in TABLE_ROLES),
            percent(rounds["attention"]),
            percent(rounds["non_expert"]),
            percent(rounds[f"lora_r{LORA_RANK}_attention"]),
            percent(r["grafted_expert_per_layer_fraction"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    checks = [
        f"{r['model']} {100 * r['roles']['routed_expert']:.1f}% "
        f"(expected {100 * r['expected_routed_expert_share']:.1f}%)"
        for r in results
        if r["expected_routed_expert_share"]
    ]
    lines += ["", "Routed-expert share cross-check: " + ", ".join(checks) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    results = []
    for hub_id, config in PUBLISHED.items():
        result = measure(hub_id, config)
        results.append(result)
        rounds = result["round_fraction"]
        print(
            f"{hub_id}: {result['total_params'] / 1e9:.2f}B params, routed experts "
            f"{100 * result['roles']['routed_expert']:.1f}%; a FLEx round ships "
            f"{100 * rounds['attention']:.2f}% (attention) / {100 * rounds['non_expert']:.2f}% "
            f"(non-expert) / {100 * rounds[f'lora_r{LORA_RANK}_attention']:.3f}% (LoRA) of a "
            f"full-model round; one grafted expert per layer = "
            f"{100 * result['grafted_expert_per_layer_fraction']:.2f}% of the model"
        )
        expected = result["expected_routed_expert_share"]
        if expected is not None and abs(result["roles"]["routed_expert"] - expected) > 0.001:
            raise SystemExit(f"{hub_id}: routed-expert share differs from the expected {expected}")
    (HERE / "param_share.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "param_share.md").write_text(markdown(results))


if __name__ == "__main__":
    main()

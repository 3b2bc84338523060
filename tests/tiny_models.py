"""Tiny random-weight models of every MoE family flexmoe supports, for tests (no hub downloads).

Each family is a config small enough to build in milliseconds (hidden 32, 2-3 layers, 8 experts,
vocab 160, fp32) yet shaped like the real thing: Qwen2-MoE has a gated shared expert and a dense
layer, DeepSeek models have a dense first layer and group-limited routing, DeepSeek-V3 a non-zero
correction bias. `build_tiny` re-draws router weights at a scale that makes routing decisive:
the default init (std 0.02) gives near-uniform router probabilities, where top-k is decided by
noise and a routing bug would go unnoticed.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DbrxConfig,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    GraniteMoeConfig,
    GraniteMoeSharedConfig,
    Llama4TextConfig,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

HIDDEN = 32
VOCAB = 160
EXPERTS = 8
# Shared by every tiny config: small attention, fp32, no dropout, untied unless a family test ties.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    dtype="float32",
)
# Router weights are redrawn at std ROUTER_SCALE / sqrt(hidden): logits of std ~ROUTER_SCALE on
# normalised inputs, so the top-k choice is clear-cut for most tokens.
ROUTER_SCALE = 2.0


def _qwen2_moe() -> PretrainedConfig:
    return Qwen2MoeConfig(
        **_COMMON,
        num_hidden_layers=3,
        intermediate_size=64,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=48,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    )


def _qwen3_moe() -> PretrainedConfig:
    return Qwen3MoeConfig(
        **_COMMON,
        num_hidden_layers=2,
        head_dim=8,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )


def _olmoe() -> PretrainedConfig:
    return OlmoeConfig(
        **_COMMON,
        num_hidden_layers=2,
        intermediate_size=24,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    )


def _mixtral() -> PretrainedConfig:
    return MixtralConfig(
        **_COMMON,
        num_hidden_layers=2,
        intermediate_size=24,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
    )


def _deepseek_v2() -> PretrainedConfig:
    return DeepseekV2Config(
        **{**_COMMON, "num_key_value_heads": 4},  # multi-head latent attention: no GQA
        num_hidden_layers=3,
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
    )


def _deepseek_v3() -> PretrainedConfig:
    return DeepseekV3Config(
        **{**_COMMON, "num_key_value_heads": 4},  # multi-head latent attention: no GQA
        num_hidden_layers=3,
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
    )


def _granitemoe() -> PretrainedConfig:
    return GraniteMoeConfig(
        **_COMMON,
        num_hidden_layers=2,
        intermediate_size=24,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        residual_multiplier=0.5,
    )


def _granitemoeshared() -> PretrainedConfig:
    return GraniteMoeSharedConfig(
        **_COMMON,
        num_hidden_layers=2,
        intermediate_size=24,
        shared_intermediate_size=48,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        residual_multiplier=0.5,
    )


def _phimoe() -> PretrainedConfig:
    return PhimoeConfig(
        **_COMMON,
        num_hidden_layers=2,
        intermediate_size=24,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        # the sparsemixer's relative threshold (0.01 in Phi-3.5-MoE): wide enough here that
        # several experts share the softmax for many tokens, so the threshold maths is exercised
        router_jitter_noise=0.3,
    )


def _gpt_oss() -> PretrainedConfig:
    common = {**_COMMON, "num_attention_heads": 4, "num_key_value_heads": 2}
    return GptOssConfig(
        **common,
        num_hidden_layers=2,
        head_dim=8,
        intermediate_size=24,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    )


FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "mixtral": _mixtral,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "granitemoe": _granitemoe,
    "granitemoeshared": _granitemoeshared,
    "phimoe": _phimoe,
    "gpt_oss": _gpt_oss,
}


def _llama() -> PretrainedConfig:
    return LlamaConfig(**_COMMON, num_hidden_layers=2, intermediate_size=64)


def _dbrx() -> PretrainedConfig:
    return DbrxConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        n_heads=4,
        n_layers=2,
        max_seq_len=128,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 24, "moe_num_experts": EXPERTS, "moe_top_k": 2},
        pad_token_id=0,
        dtype="float32",
    )


def _llama4_text() -> PretrainedConfig:
    return Llama4TextConfig(
        **_COMMON,
        num_hidden_layers=2,
        head_dim=8,
        intermediate_size=24,
        intermediate_size_mlp=64,
        num_local_experts=EXPERTS,
        num_experts_per_tok=1,
    )


DENSE: dict[str, Callable[[], PretrainedConfig]] = {"llama": _llama}
UNSUPPORTED: dict[str, Callable[[], PretrainedConfig]] = {
    "dbrx": _dbrx,
    "llama4_text": _llama4_text,
}

_ALL = {**FAMILIES, **DENSE, **UNSUPPORTED}


def build_tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of `family` in eval mode; `overrides` are set on the config."""
    if family not in _ALL:
        raise KeyError(f"unknown tiny family {family!r}; choose from {sorted(_ALL)}")
    config = _ALL[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_routers(model, seed)
    return model.eval()


def save_tiny(family: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    """Save `build_tiny(family, seed)` with `save_pretrained` (no tokenizer) and return the dir."""
    path = Path(path)
    build_tiny(family, seed, **overrides).save_pretrained(path)
    return path


@torch.no_grad()
def _spread_routers(model: torch.nn.Module, seed: int) -> None:
    """Redraw router weights (and DeepSeek-V3 correction biases) so routing is not near-uniform."""
    generator = torch.Generator().manual_seed(seed + 1)
    for name, module in model.named_modules():
        if not name.endswith((".gate", ".router")) or not hasattr(module, "weight"):
            continue
        weight = module.weight
        if weight.dim() != 2 or weight.shape[0] < 2:  # e.g. Qwen2-MoE's 1-output shared_expert_gate
            continue
        std = ROUTER_SCALE / weight.shape[1] ** 0.5
        weight.copy_(torch.randn(weight.shape, generator=generator) * std)
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)

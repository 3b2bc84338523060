"""Find the MoE blocks of a transformers model and expose their router, experts and routing.

transformers 5.x builds most MoE decoders from one protocol: a sparse block with a fused `experts`
child whose class is decorated by `@use_experts_implementation` (which stamps the layout flags
`has_gate`, `has_bias`, `is_transposed`, `is_concatenated` on the instance) and a router child
(`gate` or `router`) called as `router(x) -> (logits, topk_weights, topk_index)`. Discovery
follows that protocol instead of a chain of model types, so dense layers inside MoE models
(Qwen2-MoE's `mlp_only_layers`, DeepSeek's `first_k_dense_replace`) are skipped because they have
no such block, and families built differently (DBRX, Llama-4, JetMoE, ...) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flexmoe.moe.routing import RoutingSpec
from flexmoe.runtime import console

SUPPORTED_FAMILIES: tuple[str, ...] = (
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "mixtral",
    "deepseek_v2",
    "deepseek_v3",
    "granitemoe",
    "granitemoeshared",
    "phimoe",
    "gpt_oss",
)
"""Model types whose discovery, routing and expert maths are checked by flexmoe's tests.
Other model types that follow the same protocol load too (with a warning): their routing is
still checked against the router on a probe batch."""

PERSONAL_ATTRIBUTE = "_flexmoe_personal"
"""flexmoe sets this attribute to True on every module it adds (grafted expert, its gate): such
modules are personal, never shared experts, even when they sit inside a MoE block."""

_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
_ROUTER_NAMES = ("gate", "router")
_EXPERT_CHUNK_ELEMENTS = 1 << 24  # bound on the activation size of `expert_forward(e=None)`
_warned_model_types: set[str] = set()  # warn once per process about an untested family


class UnsupportedModelError(ValueError):
    """The model has no MoE blocks flexmoe can adapt (dense, or a custom MoE layout)."""


@dataclass
class MoELayer:
    """One sparse MoE block of a decoder layer, with the maths FLEx needs on its experts."""

    layer_index: int
    path: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared_experts: list[nn.Module]

    @property
    def decoder_layer_path(self) -> str:
        """Path of the decoder layer holding the block, e.g. "model.layers.1"."""
        return _split_block_path(self.path)[0]

    @property
    def routing(self) -> RoutingSpec:
        """Re-read on each access so it follows the router's buffers across `.to()` moves."""
        return RoutingSpec.from_router(self.router)

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def hidden_size(self) -> int:
        return self.expert_weights(0)["down"].shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.expert_weights(0)["down"].shape[1]

    def expert_weights(self, e: int) -> dict[str, Tensor | None]:
        """Views of expert `e`'s tensors in one layout: gate/up [I, H], down [H, I], biases [I]/[H].

        "gate" (and "gate_bias") is None for ungated experts; bias keys exist only if the experts
        have biases. These are views into the fused parameters: clone before training them.
        """
        self._check_expert(e)
        ex = self.experts
        if ex.has_gate:
            gate_up = self._canonical(ex.gate_up_proj[e])
            gate, up = self._split_gate_up(gate_up)
        else:
            gate, up = None, self._canonical(ex.up_proj[e])
        weights: dict[str, Tensor | None] = {
            "gate": gate,
            "up": up,
            "down": self._canonical(ex.down_proj[e]),
        }
        if ex.has_bias:
            if ex.has_gate:
                weights["gate_bias"], weights["up_bias"] = self._split_gate_up(
                    ex.gate_up_proj_bias[e]
                )
            else:
                weights["gate_bias"], weights["up_bias"] = None, ex.up_proj_bias[e]
            weights["down_bias"] = ex.down_proj_bias[e]
        return weights

    def expert_forward(self, x2d: Tensor, e: int | None = None) -> Tensor:
        """Unweighted output of expert `e` on tokens [T, H] -> [T, H], or of every expert [E, T, H].

        Uses the experts module's own gate function (`_apply_gate`: SiLU-GLU, GPT-OSS's clamped
        SwiGLU, ...) on its native layout, so it matches what the block computes per expert.
        All experts are computed in chunks so the intermediate activations stay bounded.
        """
        if e is not None:
            self._check_expert(e)
            return self._experts_slice(x2d, slice(e, e + 1))[0]
        per_expert = x2d.shape[0] * 2 * self.intermediate_size
        chunk = max(1, _EXPERT_CHUNK_ELEMENTS // max(per_expert, 1))
        outputs = [
            self._experts_slice(x2d, slice(start, start + chunk))
            for start in range(0, self.num_experts, chunk)
        ]
        return torch.cat(outputs, dim=0)

    def router_logits(self, x2d: Tensor) -> Tensor:
        """Raw router logits [T, E], computed by the router itself (run it in eval mode)."""
        return self.router(x2d)[0]

    def dense_weights(self, x2d: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Shortcut: `routing.dense_weights(router_logits(x2d), allowed)`, fp32 [T, E]."""
        return self.routing.dense_weights(self.router_logits(x2d), allowed)

    def _experts_slice(self, x2d: Tensor, experts: slice) -> Tensor:
        ex = self.experts
        first = ex.gate_up_proj if ex.has_gate else ex.up_proj
        first_bias = (
            (ex.gate_up_proj_bias if ex.has_gate else ex.up_proj_bias) if ex.has_bias else None
        )
        hidden = self._project(x2d, first[experts], first_bias, experts)
        hidden = ex._apply_gate(hidden) if ex.has_gate else ex.act_fn(hidden)
        down_bias = ex.down_proj_bias if ex.has_bias else None
        out = self._project(hidden, ex.down_proj[experts], down_bias, experts)
        if getattr(ex, "has_post_expert_norm", False):
            out = ex.post_expert_norm(out)
        return out

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None, experts: slice) -> Tensor:
        """x [T, in] or [E', T, in] times per-expert weights [E', out, in] (or transposed)."""
        out = x @ weight if self.experts.is_transposed else x @ weight.transpose(-1, -2)
        if bias is not None:
            out = out + bias[experts].unsqueeze(-2)
        return out

    def _canonical(self, weight: Tensor) -> Tensor:
        return weight.T if self.experts.is_transposed else weight

    def _split_gate_up(self, gate_up: Tensor) -> tuple[Tensor, Tensor]:
        """Split the fused first projection (rows [gate; up], or interleaved gate0, up0, ...)."""
        if self.experts.is_concatenated:
            half = gate_up.shape[0] // 2
            return gate_up[:half], gate_up[half:]
        return gate_up[0::2], gate_up[1::2]

    def _check_expert(self, e: int) -> None:
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} out of range: {self.path} has {self.num_experts} experts")


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of `model`, in layer order; refuse models flexmoe cannot adapt."""
    model_type = _model_type(model)
    layers, custom = [], []
    for path, module in model.named_modules():
        experts_slot = module._modules.get("experts")
        if experts_slot is None:
            continue
        experts = peft_base(experts_slot)
        if not all(hasattr(experts, flag) for flag in _LAYOUT_FLAGS):
            custom.append(f"{path}.experts ({type(experts).__name__})")
            continue
        router_slot = next(
            (module._modules[n] for n in _ROUTER_NAMES if n in module._modules), None
        )
        if router_slot is None:
            custom.append(f"{path} (no `gate`/`router` child)")
            continue
        decoder_layer_path, layer_index, _ = _split_block_path(path)
        routed = (experts_slot, router_slot)
        shared = [child for child in module.children() if not any(child is m for m in routed)]
        shared += _decoder_level_shared_experts(model.get_submodule(decoder_layer_path))
        shared = [m for m in shared if not getattr(m, PERSONAL_ATTRIBUTE, False)]
        layer = MoELayer(layer_index, path, module, peft_base(router_slot), experts, shared)
        layers.append(layer)
    if custom:
        raise UnsupportedModelError(
            f"model type {model_type!r} uses a MoE layout flexmoe does not adapt: {custom[0]}"
            f"{f' and {len(custom) - 1} more' if len(custom) > 1 else ''} "
            f"(its experts are not a transformers `use_experts_implementation` module with a "
            f"`gate`/`router` sibling). Supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    if not layers:
        raise UnsupportedModelError(
            f"model type {model_type!r} has no MoE layers (a dense model?). flexmoe fine-tunes "
            f"Mixture-of-Experts models; supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    for layer in layers:
        _check_routing(layer, model_type)
    if model_type not in SUPPORTED_FAMILIES and model_type not in _warned_model_types:
        _warned_model_types.add(model_type)
        console.print(
            f"[yellow]warning:[/] model type {model_type!r} follows the transformers MoE protocol "
            f"and its routing matched the probe, but flexmoe's tests cover only "
            f"{', '.join(SUPPORTED_FAMILIES)}."
        )
    return layers


def describe(model: nn.Module) -> dict:
    """A JSON-able summary of the model's MoE structure for the CLI and reports."""
    layers = find_moe_layers(model)
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)

    def one_or_all(values: list) -> object:
        distinct = list(dict.fromkeys(values))
        return distinct[0] if len(distinct) == 1 else distinct

    moe_indices = [layer.layer_index for layer in layers]
    return {
        "model_type": _model_type(model),
        "verified_family": _model_type(model) in SUPPORTED_FAMILIES,
        "num_layers": num_layers,
        "moe_layers": len(layers),
        "dense_layers": [i for i in range(num_layers or 0) if i not in moe_indices],
        "block_path": _block_path_pattern(layers[0].path),
        "num_experts": one_or_all([layer.num_experts for layer in layers]),
        "top_k": one_or_all([layer.top_k for layer in layers]),
        "hidden_size": one_or_all([layer.hidden_size for layer in layers]),
        "expert_intermediate_size": one_or_all([layer.intermediate_size for layer in layers]),
        "shared_experts": one_or_all([len(layer.shared_experts) > 0 for layer in layers]),
        "routing": one_or_all([layer.routing.summary() for layer in layers]),
        "experts_implementation": getattr(config, "_experts_implementation", None),
    }


def peft_base(module: nn.Module) -> nn.Module:
    """The module a peft tuner layer wraps (LoRA on a router or on fused experts), else itself."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _block_path_pattern(path: str) -> str:
    """'model.layers.3.mlp' -> 'model.layers.{i}.mlp'."""
    decoder_layer_path, _, inner = _split_block_path(path)
    return f"{decoder_layer_path.rpartition('.')[0]}.{{i}}.{inner}"


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def _split_block_path(path: str) -> tuple[str, int, str]:
    """'model.layers.3.mlp' -> ('model.layers.3', 3, 'mlp'): decoder layer path, its index in
    the layer list (the last integer component) and the block's path inside the layer."""
    parts = path.split(".")
    positions = [i for i, part in enumerate(parts) if part.isdigit()]
    if not positions:
        raise UnsupportedModelError(f"MoE block {path!r} is not inside a list of decoder layers")
    last = positions[-1]
    return ".".join(parts[: last + 1]), int(parts[last]), ".".join(parts[last + 1 :])


def _decoder_level_shared_experts(decoder_layer: nn.Module) -> list[nn.Module]:
    """Shared experts that live beside the block in the decoder layer (GraniteMoeShared's
    `shared_mlp`): children of the decoder layer whose attribute name says "shared"."""
    return [child for name, child in decoder_layer.named_children() if "shared" in name]


@torch.no_grad()
def _check_routing(layer: MoELayer, model_type: str) -> None:
    """Run the router on a seeded probe batch and check `RoutingSpec` reproduces its choice."""
    weight = next(layer.router.parameters(), None)
    if weight is None or weight.device.type == "meta":
        return  # nothing to compute on (e.g. a model built on the meta device for accounting)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(64, weight.shape[-1], generator=generator).to(weight.device, weight.dtype)
    was_training = layer.router.training
    layer.router.eval()
    try:
        output = layer.router(probe)
    finally:
        layer.router.train(was_training)
    if not (isinstance(output, tuple) and len(output) == 3):
        raise UnsupportedModelError(
            f"the router of {layer.path} ({type(layer.router).__name__}, model type "
            f"{model_type!r}) does not return (logits, top-k weights, top-k indices). "
            f"Supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    logits, top_weights, top_index = output
    expected = torch.zeros_like(logits, dtype=torch.float32)
    expected.scatter_add_(-1, top_index, top_weights.float())
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2e-2
    ours = layer.routing.dense_weights(logits)
    if not torch.allclose(ours, expected, rtol=tolerance, atol=tolerance):
        raise UnsupportedModelError(
            f"the router of {layer.path} ({type(layer.router).__name__}, model type "
            f"{model_type!r}) computes weights flexmoe's routing spec "
            f"({layer.routing.summary()}) does not reproduce (max difference "
            f"{(ours - expected).abs().max().item():.2e}). Supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}."
        )

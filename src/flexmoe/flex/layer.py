"""The modules FLEx adds beside a MoE block: grafted expert copies and their sigmoid gates.

    y = block(x) + sum_i g_i(x) * E_i(x),   g_i(x) = sigmoid(w_i . x + b_i)

E_i is a trainable copy of a selected routed expert and (w_i, b_i) start as that expert's router
row, so the gate opens where the router already liked the expert. Every module here carries
`_flexmoe_personal = True`: its tensors are personal (kept on the client, never aggregated).

Leaf names avoid `gate_proj`, `up_proj`, `down_proj`, `gate` (and Mixtral's `w1`/`w2`/`w3`):
peft rewrites LoRA targets with those names onto the fused experts of MoE model types.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from flexmoe.flex.config import FlexConfig
from flexmoe.flex.errors import FlexError
from flexmoe.flex.selection import LayerSelection
from flexmoe.moe import MoELayer


class GraftedExpert(nn.Module):
    """A standalone, trainable copy of one routed expert as plain Linear layers.

    `act_proj` is the expert's gate projection (its output goes through the activation), `in_proj`
    its up projection, `out_proj` its down projection. The weights are clones, never views of the
    fused expert tensors: training the copy must not touch the frozen original.
    """

    _flexmoe_personal = True

    def __init__(self, layer: MoELayer, expert: int) -> None:
        super().__init__()
        weights = layer.expert_weights(expert)
        gate = weights["gate"]
        self.act_proj = None if gate is None else _cloned_linear(gate, weights.get("gate_bias"))
        self.in_proj = _cloned_linear(weights["up"], weights.get("up_bias"))
        self.out_proj = _cloned_linear(weights["down"], weights.get("down_bias"))
        experts = layer.experts
        # The family's own activation (SiLU-GLU, GPT-OSS's clamped SwiGLU, ...), which works on its
        # native [gate; up] or interleaved layout. It holds no trainable tensors: borrowing the
        # experts' bound method keeps the copy's function identical to the original's.
        self._interleaved = not experts.is_concatenated
        self._apply_gate = experts._apply_gate
        self.activation = copy.deepcopy(experts.act_fn) if gate is None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.act_proj is None:
            hidden = self.activation(self.in_proj(x))
        else:
            gate, up = self.act_proj(x), self.in_proj(x)
            if self._interleaved:
                native = torch.stack((gate, up), dim=-1).flatten(-2)
            else:
                native = torch.cat((gate, up), dim=-1)
            hidden = self._apply_gate(native)
        return self.out_proj(hidden)


class GraftGate(nn.Module):
    """Per-token weight of one grafted expert: sigmoid(w . x + b), from the expert's router row.

    With `zero_init`, the weight is additionally multiplied by a scalar `scale` that starts at 0,
    so the freshly grafted model computes exactly the base model. Its gradient is the only
    non-zero one at the start (the graft and the gate's own weights get zero gradient while
    scale = 0), so the first optimiser step moves `scale` alone and the rest follow.
    """

    _flexmoe_personal = True

    def __init__(self, router: nn.Module, expert: int, zero_init: bool) -> None:
        super().__init__()
        weight = router.weight
        if weight.dim() != 2 or not 0 <= expert < weight.shape[0]:
            raise FlexError(
                f"cannot initialise a gate from router weight of shape {tuple(weight.shape)} for "
                f"expert {expert}: expected one row per expert"
            )
        router_bias = getattr(router, "bias", None)
        bias = torch.zeros(1) if router_bias is None else router_bias[expert : expert + 1]
        self.proj = _cloned_linear(weight[expert : expert + 1], bias.to(weight))
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
        self.scale = nn.Parameter(zero) if zero_init else None

    def forward(self, x: Tensor) -> Tensor:
        weight = torch.sigmoid(self.proj(x))
        return weight if self.scale is None else weight * self.scale


class FlexGraft(nn.Module):
    """The grafted expert(s) of one MoE block with their gates; its output is added to the
    block's output (see `flexmoe.flex.model.graft`). One gate per grafted expert when r > 1."""

    _flexmoe_personal = True

    def __init__(self, layer: MoELayer, selection: LayerSelection, config: FlexConfig) -> None:
        super().__init__()
        self.grafted = nn.ModuleList(GraftedExpert(layer, e) for e in selection.selected)
        self.gates = None
        if config.gate != "none":
            zero_init = config.gate == "zero-init"
            self.gates = nn.ModuleList(
                GraftGate(layer.router, e, zero_init) for e in selection.selected
            )
        self.selection = selection
        self.config = config
        self.forced_gate: float | None = None
        """When set, every gate outputs this constant instead (0.0: the base model's output)."""
        self.hook_handle: RemovableHandle | None = None
        """The forward hook on the block that adds this graft's output (set by `graft`)."""

    def forward(self, x: Tensor) -> Tensor:
        term = None
        for i, expert in enumerate(self.grafted):
            out = expert(x)
            if self.forced_gate is not None:
                out = out * self.forced_gate
            elif self.gates is not None:
                out = out * self.gates[i](x)
            term = out if term is None else term + out
        return term


def _cloned_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies (own storage) of `weight` [out, in] and `bias` [out]."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone().contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone().contiguous())
    return linear

"""Attach grafted experts to a model, beside its MoE blocks, without renaming anything.

Each MoE block gets a child `flex_graft` (a `FlexGraft`) and a forward hook that adds the
graft's output to the block's output, so:
- every original parameter keeps its name: `model.state_dict()` has all base keys unchanged (plus
  the new `...flex_graft...` keys) and a base checkpoint still loads;
- the original experts stay in place: each token uses its top-k routed experts plus the graft;
- "beside the block" means added to the block's output: a shared expert inside the block
  (Qwen2-MoE, DeepSeek) is part of that output, and where the decoder layer scales the block's
  output (GraniteMoE's `residual_multiplier`) the graft term is scaled with it, like the block's
  own experts. Blocks that return a tuple (GPT-OSS: hidden states, router scores) get the term
  added to the hidden states.
- Mixtral/PhiMoE's training-time input jitter multiplies the block input in place, so in train
  mode the graft sees the jittered input, as the block's experts do.

Regimes: "full" trains the copied expert itself; "lora" freezes the copy and trains LoRA adapters
on its Linear layers. peft injects them into the standalone grafted expert (which has no model
config), so peft's MoE target rewriting cannot move them onto the fused experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from flexmoe.flex.config import FlexConfig
from flexmoe.flex.errors import FlexError
from flexmoe.flex.layer import FlexGraft, GraftedExpert
from flexmoe.flex.selection import LayerSelection, graftable_layers

GRAFT_ATTRIBUTE = "flex_graft"
"""Name of the child each MoE block gets."""


@dataclass
class GraftHandle:
    """The grafts attached to a model, by layer index."""

    grafts: dict[int, FlexGraft]

    @property
    def selections(self) -> dict[int, LayerSelection]:
        return {index: module.selection for index, module in self.grafts.items()}

    @property
    def config(self) -> FlexConfig:
        return next(iter(self.grafts.values())).config


def graft(model: nn.Module, selections: dict[int, LayerSelection], cfg: FlexConfig) -> GraftHandle:
    """Attach a copy of each layer's selected expert(s), gated per `cfg`, to every MoE block."""
    if find_grafts(model):
        raise FlexError("the model is already grafted; call remove_graft(model) first")
    layers = graftable_layers(model)
    indices = [layer.layer_index for layer in layers]
    if sorted(selections) != indices:
        raise FlexError(
            f"selections cover layers {sorted(selections)} but the model's MoE layers are "
            f"{indices}: select experts on this model (select_experts) before grafting"
        )
    for layer in layers:
        if selections[layer.layer_index].layer_index != layer.layer_index:
            raise FlexError(
                f"the selection stored under layer {layer.layer_index} is for layer "
                f"{selections[layer.layer_index].layer_index}"
            )
        selected = selections[layer.layer_index].selected
        if len(selected) != cfg.r or len(set(selected)) != len(selected):
            raise FlexError(
                f"layer {layer.layer_index}: expected {cfg.r} distinct experts (flex.r), "
                f"got {selected}"
            )
        if not all(0 <= e < layer.num_experts for e in selected):
            raise FlexError(
                f"layer {layer.layer_index}: experts {selected} out of range; the layer has "
                f"{layer.num_experts} experts"
            )
    grafts = {}
    for layer in layers:
        module = FlexGraft(layer, selections[layer.layer_index], cfg)
        if cfg.regime == "lora":
            for expert in module.grafted:
                _inject_lora(expert, cfg)
        layer.block.add_module(GRAFT_ATTRIBUTE, module)
        module.hook_handle = layer.block.register_forward_hook(_add_graft_term, with_kwargs=True)
        grafts[layer.layer_index] = module
    return GraftHandle(grafts)


def find_grafts(model: nn.Module) -> dict[int, FlexGraft]:
    """The grafts attached to `model` (through any wrapper, e.g. a peft model), by layer index."""
    return {
        module.selection.layer_index: module
        for module in model.modules()
        if isinstance(module, FlexGraft)
    }


def remove_graft(model: nn.Module) -> None:
    """Detach every graft: the model computes (and holds) exactly the base model again."""
    for module in list(model.modules()):
        graft_module = module._modules.get(GRAFT_ATTRIBUTE)
        if isinstance(graft_module, FlexGraft):
            graft_module.hook_handle.remove()
            delattr(module, GRAFT_ATTRIBUTE)


def personal_parameter_names(model: nn.Module) -> list[str]:
    """Names (in `model.named_parameters()`) of every parameter of the grafts, in model order."""
    personal = {
        id(p) for graft_module in find_grafts(model).values() for p in graft_module.parameters()
    }
    return [name for name, param in model.named_parameters() if id(param) in personal]


def force_gate_output(model: nn.Module, value: float | None) -> None:
    """Make every graft gate output `value` for all tokens (0.0: the grafted model computes the
    base model's function through the whole graft path); None restores the learned gates."""
    grafts = find_grafts(model)
    if not grafts:
        raise FlexError("the model has no grafts: call graft(model, selections, cfg) first")
    for graft_module in grafts.values():
        graft_module.forced_gate = value


def _add_graft_term(block: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook of a grafted block: block output + the graft's term on the block's input."""
    hidden = args[0] if args else next(iter(kwargs.values()))
    term = block._modules[GRAFT_ATTRIBUTE](hidden)
    if isinstance(output, tuple):
        return (output[0] + term, *output[1:])
    return output + term


def _inject_lora(expert: GraftedExpert, cfg: FlexConfig) -> None:
    """LoRA on the copy's Linear layers; peft freezes the copy's own weights."""
    targets = [name for name, child in expert.named_children() if isinstance(child, nn.Linear)]
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
    )
    inject_adapter_in_model(lora, expert)

"""Save and restore a client's personal FLEx state between rounds (or runs).

A personal state is a directory with
- `personal_state.safetensors`: the grafts' trained tensors, named `layer{i}.<name in the graft>`
  (independent of wrappers such as a peft model around the base model). In the LoRA regime the
  frozen expert copies are left out: they are rebuilt from the base model on load, which the
  fingerprint below guarantees to hold the very same expert weights.
- `personal_state.json`: the FLEx options, the selection of every layer (experts and scores), the
  list of tensors, a fingerprint of the base model and the caller's metadata.

The fingerprint covers the architecture (model type, sizes, MoE layer layout) and checksums of
tensors FLEx never trains: every router and the grafted experts' original weights. It therefore
survives federated rounds (which train attention and other shared tensors) but tells a different
base checkpoint or seed apart; a mismatch is refused with `PersonalStateMismatchError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flexmoe.flex.config import FlexConfig
from flexmoe.flex.errors import FlexError, PersonalStateMismatchError
from flexmoe.flex.layer import FlexGraft
from flexmoe.flex.model import GraftHandle, find_grafts, graft, remove_graft
from flexmoe.flex.selection import LayerSelection
from flexmoe.moe import MoELayer, find_moe_layers

TENSORS_FILE = "personal_state.safetensors"
METADATA_FILE = "personal_state.json"
FORMAT_VERSION = 1


def save_personal_state(
    model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the grafts' personal tensors and their description into directory `path`."""
    grafts = find_grafts(model)
    if not grafts:
        raise FlexError("the model has no grafts, so there is no personal state to save")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _personal_tensors(grafts)
    save_file(
        {name: t.detach().contiguous() for name, t in tensors.items()}, directory / TENSORS_FILE
    )
    selections = {index: graft_module.selection for index, graft_module in grafts.items()}
    description = {
        "format_version": FORMAT_VERSION,
        "flex": dataclasses.asdict(next(iter(grafts.values())).config),
        "selections": {str(index): s.to_dict() for index, s in sorted(selections.items())},
        "base_model": base_fingerprint(model, selections),
        "tensors": sorted(tensors),
        "metadata": metadata or {},
    }
    text = json.dumps(description, indent=2, sort_keys=True) + "\n"
    (directory / METADATA_FILE).write_text(text, encoding="utf-8")
    return directory


def load_personal_state(model: nn.Module, path: str | Path) -> GraftHandle:
    """Restore a personal state onto `model` (the same base model), grafting it first if needed.

    An ungrafted model is grafted with the saved selections and options; an already grafted one
    must have the same layout. Refuses other base models and layouts with
    `PersonalStateMismatchError`, naming what differs.
    """
    description = read_personal_metadata(path)
    config = FlexConfig(**description["flex"])
    selections = {
        int(index): LayerSelection.from_dict(s) for index, s in description["selections"].items()
    }
    _check_base_model(model, description["base_model"], selections, path)
    grafts = find_grafts(model)
    if grafts:
        _check_layout(grafts, selections, config, path)
        handle = GraftHandle(grafts)
    else:
        handle = graft(model, selections, config)
    try:
        _restore_tensors(handle.grafts, load_file(Path(path) / TENSORS_FILE), path)
    except PersonalStateMismatchError:
        if not grafts:  # leave the model as it came
            remove_graft(model)
        raise
    return handle


def _restore_tensors(grafts: dict[int, FlexGraft], saved: dict[str, Tensor], path) -> None:
    expected = _personal_tensors(grafts)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise PersonalStateMismatchError(
            f"personal state {path} does not fit the model's grafts: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            if saved[name].shape != tensor.shape:
                raise PersonalStateMismatchError(
                    f"personal state {path}: tensor {name} has shape {tuple(saved[name].shape)}, "
                    f"the model's graft {tuple(tensor.shape)}"
                )
            tensor.copy_(saved[name])


def read_personal_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON description of a saved personal state (options, selections, fingerprint, ...)."""
    directory = Path(path)
    if not (directory / METADATA_FILE).is_file() or not (directory / TENSORS_FILE).is_file():
        raise FlexError(
            f"no personal state in {directory}: expected {METADATA_FILE} and {TENSORS_FILE} "
            f"(written by save_personal_state)"
        )
    description = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
    if description.get("format_version") != FORMAT_VERSION:
        raise PersonalStateMismatchError(
            f"personal state {directory} has format version {description.get('format_version')}"
            f", this flexmoe reads version {FORMAT_VERSION}"
        )
    return description


def base_fingerprint(model: nn.Module, selections: dict[int, LayerSelection]) -> dict[str, Any]:
    """Architecture fields and checksums of the never-trained tensors the grafts depend on."""
    config = getattr(model, "config", None)
    fields = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
    fingerprint: dict[str, Any] = {field: getattr(config, field, None) for field in fields}
    fingerprint["moe_layers"] = [
        _layer_fingerprint(layer, selections) for layer in find_moe_layers(model)
    ]
    return fingerprint


def _layer_fingerprint(layer: MoELayer, selections: dict[int, LayerSelection]) -> dict[str, Any]:
    selection = selections.get(layer.layer_index)
    selected = [] if selection is None else selection.selected
    in_range = all(0 <= e < layer.num_experts for e in selected)
    expert_tensors = []
    for e in selected if in_range else []:
        weights = layer.expert_weights(e)
        expert_tensors += [weights[key] for key in sorted(weights) if weights[key] is not None]
    router_state = layer.router.state_dict()
    return {
        "layer_index": layer.layer_index,
        "num_experts": layer.num_experts,
        "top_k": layer.top_k,
        "hidden_size": layer.hidden_size,
        "intermediate_size": layer.intermediate_size,
        "dtype": str(layer.router.weight.dtype).removeprefix("torch."),
        "router_sha256": _digest([router_state[key] for key in sorted(router_state)]),
        "grafted_experts_sha256": _digest(expert_tensors) if in_range else None,
    }


def _check_base_model(
    model: nn.Module, saved: dict[str, Any], selections: dict[int, LayerSelection], path
) -> None:
    current = base_fingerprint(model, selections)
    problems = [
        f"{field}: saved {saved[field]!r}, this model {current[field]!r}"
        for field in saved
        if field != "moe_layers" and saved[field] != current.get(field)
    ]
    saved_layers = [layer["layer_index"] for layer in saved["moe_layers"]]
    current_layers = [layer["layer_index"] for layer in current["moe_layers"]]
    if saved_layers != current_layers:
        problems.append(f"MoE layers: saved {saved_layers}, this model {current_layers}")
    else:
        for before, now in zip(saved["moe_layers"], current["moe_layers"], strict=True):
            problems += [
                f"layer {now['layer_index']} {field}: saved {before[field]!r}, this model "
                f"{now[field]!r}"
                for field in before
                if before[field] != now[field]
            ]
    if problems:
        shown = "; ".join(problems[:4]) + (
            f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        )
        raise PersonalStateMismatchError(
            f"personal state {path} was made for another base model ({shown}). Load it onto the "
            f"base model it was grafted on (same checkpoint and seed)."
        )


def _check_layout(
    grafts: dict[int, FlexGraft], selections: dict[int, LayerSelection], config: FlexConfig, path
) -> None:
    """An already grafted model must carry the saved grafts: same layers, experts and options."""
    current = {index: g.selection.selected for index, g in grafts.items()}
    saved = {index: s.selected for index, s in selections.items()}
    ours = next(iter(grafts.values())).config
    options = ("gate", "regime", "r") + (("lora_r",) if config.regime == "lora" else ())
    differing = [
        f"{option}: saved {getattr(config, option)!r}, model {getattr(ours, option)!r}"
        for option in options
        if getattr(config, option) != getattr(ours, option)
    ]
    if current != saved or differing:
        raise PersonalStateMismatchError(
            f"the model is grafted differently from personal state {path} (grafted experts: "
            f"saved {saved}, model {current}; {', '.join(differing) or 'same options'}). "
            f"Call remove_graft(model) first to load it onto the bare base model."
        )


def _personal_tensors(grafts: dict[int, FlexGraft]) -> dict[str, Tensor]:
    """Trained personal tensors by stable name; LoRA-frozen expert copies are left out."""
    return {
        f"layer{index}.{name}": tensor
        for index, graft_module in sorted(grafts.items())
        for name, tensor in graft_module.state_dict(keep_vars=True).items()
        if ".base_layer." not in name
    }


def _digest(tensors: list[Tensor]) -> str:
    """sha256 (first 16 hex digits) over the shapes and raw bytes of `tensors`."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        data = tensor.detach().to("cpu").contiguous().flatten()
        hasher.update(f"{tuple(tensor.shape)}{data.dtype}".encode())
        hasher.update(data.view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]

"""Personal state: a saved graft restores the client's exact model on the same base model and is
refused, with the reason, anywhere else."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny

from flexmoe.flex import (
    FlexConfig,
    FlexError,
    PersonalStateMismatchError,
    find_grafts,
    graft,
    load_personal_state,
    read_personal_metadata,
    remove_graft,
    save_personal_state,
    select_experts,
)
from flexmoe.flex.personal_state import METADATA_FILE, TENSORS_FILE

INPUT_IDS = torch.randint(3, 160, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def trained_graft(family="qwen2_moe", seed=0, **options):
    """A grafted model whose personal tensors moved away from their initial values."""
    config = FlexConfig(**options)
    model = build_tiny(family, seed=seed)
    selections = select_experts(model, [{"input_ids": INPUT_IDS}], config)
    handle = graft(model, selections, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for graft_module in handle.grafts.values():
            for param in graft_module.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model, handle


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"regime": "lora", "lora_r": 4, "gate": "zero-init"},
        {"r": 2, "strategy": "most-routed"},
    ],
)
def test_round_trip_reproduces_the_personal_model(tmp_path, options):
    model, handle = trained_graft(**options)
    expected = logits(model)
    save_personal_state(model, tmp_path / "client0", metadata={"client": 0, "round": 3})

    fresh = build_tiny("qwen2_moe", seed=0)
    assert not torch.equal(logits(fresh), expected)
    restored = load_personal_state(fresh, tmp_path / "client0")
    assert torch.equal(logits(fresh), expected)
    assert {i: s.selected for i, s in restored.selections.items()} == {
        i: s.selected for i, s in handle.selections.items()
    }
    assert restored.config == FlexConfig(**options)

    # loading onto a model already grafted with the same layout works too
    same_layout = build_tiny("qwen2_moe", seed=0)
    graft(same_layout, handle.selections, FlexConfig(**options))
    load_personal_state(same_layout, tmp_path / "client0")
    assert torch.equal(logits(same_layout), expected)


def test_saved_files_hold_exactly_the_personal_tensors_and_the_description(tmp_path):
    model, handle = trained_graft(regime="lora", lora_r=4)
    save_personal_state(model, tmp_path, metadata={"client": 1})
    tensors = load_file(tmp_path / TENSORS_FILE)
    graft_names = {
        f"layer{index}.{name}"
        for index, module in handle.grafts.items()
        for name, _ in module.named_parameters()
    }
    # the LoRA-frozen expert copies are rebuilt from the base model, not stored
    assert set(tensors) == {n for n in graft_names if ".base_layer." not in n}
    assert any(".lora_B." in n for n in tensors) and any(".gates." in n for n in tensors)

    description = read_personal_metadata(tmp_path)
    assert description["metadata"] == {"client": 1}
    assert description["flex"]["regime"] == "lora"
    assert description["tensors"] == sorted(tensors)
    for index, selection in handle.selections.items():
        saved = description["selections"][str(index)]
        assert saved["selected"] == selection.selected
        assert saved["scores"] == pytest.approx(selection.scores)
    layers = description["base_model"]["moe_layers"]
    assert [layer["layer_index"] for layer in layers] == sorted(handle.grafts)
    assert all(len(layer["router_sha256"]) == 16 for layer in layers)


def test_a_different_base_model_is_refused(tmp_path):
    model, _ = trained_graft(seed=0)
    save_personal_state(model, tmp_path)
    other_seed = build_tiny("qwen2_moe", seed=1)
    with pytest.raises(PersonalStateMismatchError, match="router_sha256"):
        load_personal_state(other_seed, tmp_path)
    assert not find_grafts(other_seed)  # nothing attached on refusal

    shared_trained = build_tiny("qwen2_moe", seed=0)
    with torch.no_grad():  # federated rounds train attention: still the same base model
        shared_trained.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    load_personal_state(shared_trained, tmp_path)

    expert_changed = build_tiny("qwen2_moe", seed=0)
    with torch.no_grad():
        expert_changed.model.layers[0].mlp.experts.gate_up_proj.add_(0.1)
    with pytest.raises(PersonalStateMismatchError, match="grafted_experts_sha256"):
        load_personal_state(expert_changed, tmp_path)


def test_a_different_layout_is_refused(tmp_path):
    model, handle = trained_graft(seed=0)
    save_personal_state(model, tmp_path)
    more_experts = build_tiny("qwen2_moe", seed=0, num_experts=16)
    with pytest.raises(PersonalStateMismatchError, match="num_experts: saved 8, this model 16"):
        load_personal_state(more_experts, tmp_path)
    other_layers = build_tiny("qwen2_moe", seed=0, mlp_only_layers=[0])
    with pytest.raises(PersonalStateMismatchError, match=r"MoE layers: saved \[0, 2\]"):
        load_personal_state(other_layers, tmp_path)
    other_family = build_tiny("olmoe", seed=0)
    with pytest.raises(PersonalStateMismatchError, match="model_type: saved 'qwen2_moe'"):
        load_personal_state(other_family, tmp_path)

    regrafted = build_tiny("qwen2_moe", seed=0)
    first = min(handle.selections)
    other = dict(handle.selections)
    other[first] = dataclasses.replace(other[first], selected=[(other[first].selected[0] + 1) % 8])
    graft(regrafted, other, FlexConfig())
    with pytest.raises(PersonalStateMismatchError, match="grafted differently"):
        load_personal_state(regrafted, tmp_path)
    remove_graft(regrafted)
    load_personal_state(regrafted, tmp_path)
    assert torch.equal(logits(regrafted), logits(model))


def test_missing_or_foreign_files_are_refused(tmp_path):
    model, _ = trained_graft()
    with pytest.raises(FlexError, match="no personal state"):
        load_personal_state(model, tmp_path / "nowhere")
    with pytest.raises(FlexError, match="no grafts"):
        save_personal_state(build_tiny("qwen2_moe"), tmp_path / "bare")
    save_personal_state(model, tmp_path / "state")
    description = json.loads((tmp_path / "state" / METADATA_FILE).read_text())
    description["format_version"] = 99
    (tmp_path / "state" / METADATA_FILE).write_text(json.dumps(description))
    with pytest.raises(PersonalStateMismatchError, match="format version 99"):
        load_personal_state(build_tiny("qwen2_moe"), tmp_path / "state")


def test_a_tensor_file_that_does_not_fit_is_refused_and_leaves_the_model_bare(tmp_path):
    model, _ = trained_graft()
    save_personal_state(model, tmp_path)
    tensors = load_file(tmp_path / TENSORS_FILE)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / TENSORS_FILE)
    fresh = build_tiny("qwen2_moe", seed=0)
    with pytest.raises(PersonalStateMismatchError, match="does not fit the model's grafts"):
        load_personal_state(fresh, tmp_path)
    assert not find_grafts(fresh)

"""Grafting: the graft really is in the forward, leaves the base model intact (names, weights,
function when its gate outputs 0), is a clone, and trains only what it should."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, build_tiny
from transformers import AutoModelForCausalLM, NemotronHConfig

from flexmoe.flex import (
    FlexConfig,
    FlexError,
    GraftedExpert,
    find_grafts,
    force_gate_output,
    graft,
    personal_parameter_names,
    remove_graft,
    select_experts,
)
from flexmoe.moe import find_moe_layers
from flexmoe.moe.roles import Role, assign_roles, freeze_for

INPUT_IDS = torch.randint(3, 160, (2, 10), generator=torch.Generator().manual_seed(0))


def selected(model, **options):
    """Selections on a little local data (the choice itself is tested in test_selection)."""
    return select_experts(model, [{"input_ids": INPUT_IDS}], FlexConfig(**options))


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_graft_is_in_the_forward_and_a_zero_gate_gives_the_base_model(family):
    model = build_tiny(family, seed=0)
    base_logits, base_state = logits(model), model.state_dict()
    handle = graft(model, selected(model), FlexConfig(gate="sigmoid"))
    assert sorted(handle.grafts) == [layer.layer_index for layer in find_moe_layers(model)]

    grafted_logits = logits(model)
    assert (grafted_logits - base_logits).abs().max() > 1e-2  # the graft term is really added
    force_gate_output(model, 0.0)
    assert torch.equal(logits(model), base_logits)  # ... through the hook, times a zero gate
    force_gate_output(model, None)
    assert torch.equal(logits(model), grafted_logits)

    state = model.state_dict()
    added = set(state) - set(base_state)
    assert added and all(".flex_graft." in name for name in added)
    assert all(torch.equal(state[name], tensor) for name, tensor in base_state.items())
    fresh = build_tiny(family, seed=0)
    graft(fresh, handle.selections, FlexConfig())
    missing, unexpected = fresh.load_state_dict(base_state, strict=False)
    assert set(missing) == added and not unexpected

    remove_graft(model)
    assert not find_grafts(model) and model.state_dict().keys() == base_state.keys()
    assert torch.equal(logits(model), base_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_gate_starts_as_the_base_model(family):
    model = build_tiny(family, seed=0)
    base_logits = logits(model)
    graft(model, selected(model), FlexConfig(gate="zero-init"))
    assert torch.equal(logits(model), base_logits)
    force_gate_output(model, 1.0)  # the graft path itself is live
    assert (logits(model) - base_logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_grafted_expert_computes_the_selected_expert(family):
    model = build_tiny(family, seed=0)
    selections = selected(model, r=2)
    handle = graft(model, selections, FlexConfig(r=2))
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    for layer in find_moe_layers(model):
        module = handle.grafts[layer.layer_index]
        for expert, gate, e in zip(
            module.grafted, module.gates, selections[layer.layer_index].selected, strict=True
        ):
            torch.testing.assert_close(expert(x), layer.expert_forward(x, e), rtol=1e-6, atol=1e-6)
            assert torch.equal(gate.proj.weight[0], layer.router.weight[e])
            router_bias = getattr(layer.router, "bias", None)
            expected_bias = 0.0 if router_bias is None else router_bias[e]
            assert torch.equal(gate.proj.bias[0], torch.as_tensor(expected_bias))
            leaves = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
            assert not leaves & {"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}


def test_gate_none_adds_the_expert_unweighted():
    model = build_tiny("qwen3_moe", seed=0)
    selections = selected(model)
    graft(model, selections, FlexConfig(gate="none"))
    ungated = logits(model)
    remove_graft(model)
    graft(model, selections, FlexConfig(gate="sigmoid"))
    force_gate_output(model, 1.0)
    assert torch.equal(logits(model), ungated)


def train_steps(model, steps=2, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_graft_is_a_clone_and_saves_with_safetensors(tmp_path):
    model = build_tiny("qwen2_moe", seed=0)
    handle = graft(model, selected(model), FlexConfig())
    experts_before = {
        layer.layer_index: layer.experts.state_dict() for layer in find_moe_layers(model)
    }
    experts_before = {i: {k: v.clone() for k, v in s.items()} for i, s in experts_before.items()}
    base_storages = {
        p.untyped_storage().data_ptr()
        for name, p in model.named_parameters()
        if ".flex_graft." not in name
    }
    graft_params = [p for g in handle.grafts.values() for p in g.parameters()]
    assert not {p.untyped_storage().data_ptr() for p in graft_params} & base_storages

    for p in model.parameters():
        p.requires_grad_(False)
    for p in graft_params:
        p.requires_grad_(True)
    copies_before = [p.detach().clone() for p in graft_params]
    train_steps(model)
    assert any(not torch.equal(p, q) for p, q in zip(graft_params, copies_before, strict=True))
    for layer in find_moe_layers(model):
        for name, tensor in layer.experts.state_dict().items():
            assert torch.equal(tensor, experts_before[layer.layer_index][name])

    save_file(model.state_dict(), tmp_path / "model.safetensors")
    reloaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())


def changed_parameters(model, before):
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_freezing_after_graft_trains_only_attention_and_the_graft(family):
    model = build_tiny(family, seed=0)
    graft(model, selected(model), FlexConfig(regime="full"))
    trainable = set(freeze_for(model, "attention"))
    personal = set(personal_parameter_names(model))
    roles = assign_roles(model)
    assert personal == {name for name, role in roles.items() if role is Role.PERSONAL}
    assert personal <= trainable
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(model)
    changed = changed_parameters(model, before)
    assert changed <= trainable
    assert personal <= changed  # the graft copy and its gate both learn
    assert {n for n in changed if roles[n] is Role.ATTENTION}
    frozen_roles = {Role.ROUTED_EXPERT, Role.ROUTER, Role.SHARED_EXPERT, Role.EMBEDDING}
    assert not {n for n in changed if roles[n] in frozen_roles}


def test_lora_regime_trains_lora_and_gate_only_and_never_touches_the_fused_experts():
    model = build_tiny("qwen2_moe", seed=0)
    config = FlexConfig(regime="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    handle = graft(model, selected(model), config)
    names = [name for name, _ in model.named_parameters()]
    lora_names = {n for n in names if ".lora_A." in n or ".lora_B." in n}
    assert lora_names and all(".flex_graft.grafted." in n for n in lora_names)
    for layer in find_moe_layers(model):  # LoRA did not land on the fused experts or router
        assert not any("lora" in n for n, _ in layer.block.named_modules() if "flex_graft" not in n)
        assert type(layer.block.experts) is type(layer.experts)
    copies = {n for n in names if ".flex_graft.grafted." in n and ".base_layer." in n}
    assert len(copies) == 3 * len(handle.grafts)

    trainable = set(freeze_for(model, "attention"))
    assert lora_names <= trainable and not copies & trainable
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(model)
    changed = changed_parameters(model, before)
    personal_changed = {n for n in changed if ".flex_graft." in n}
    gates = {n for n in names if ".flex_graft.gates." in n}
    assert personal_changed == lora_names | gates
    assert not changed & copies


def test_graft_refuses_bad_selections():
    model = build_tiny("olmoe", seed=0)
    selections = selected(model)
    with pytest.raises(FlexError, match="expected 2 distinct experts"):
        graft(model, selections, FlexConfig(r=2))
    wrong_layers = {index + 5: s for index, s in selections.items()}
    with pytest.raises(FlexError, match="selections cover layers"):
        graft(model, wrong_layers, FlexConfig())
    graft(model, selections, FlexConfig())
    with pytest.raises(FlexError, match="already grafted"):
        graft(model, selections, FlexConfig())


def test_grafted_expert_is_a_plain_module_with_copied_weights():
    model = build_tiny("gpt_oss", seed=0)  # interleaved, transposed experts with biases
    layer = find_moe_layers(model)[0]
    expert = GraftedExpert(layer, 3)
    weights = layer.expert_weights(3)
    assert torch.equal(expert.act_proj.weight, weights["gate"])
    assert torch.equal(expert.in_proj.bias, weights["up_bias"])
    assert expert.out_proj.weight.is_contiguous()
    assert expert.out_proj.weight.data_ptr() != weights["down"].data_ptr()


def test_a_grafted_model_deep_copies_into_an_independent_model():
    model = build_tiny("gpt_oss", seed=0)
    graft(model, selected(model), FlexConfig())
    copy_ = copy.deepcopy(model)
    assert torch.equal(logits(copy_), logits(model))
    with torch.no_grad():
        next(iter(find_grafts(copy_).values())).grafted[0].out_proj.weight.add_(1.0)
    assert not torch.equal(logits(copy_), logits(model))
    copy_graft = next(iter(find_grafts(copy_).values())).grafted[0]
    assert copy_graft._apply_gate.__self__ is find_moe_layers(copy_)[0].experts


def tiny_nemotron_h(**overrides):
    """NemotronH: ungated experts (up -> act -> down), outside the families flexmoe verifies."""
    config = NemotronHConfig(
        vocab_size=160,
        hidden_size=32,
        layers_block_type=["moe", "attention", "moe"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=24,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        use_mamba_kernels=False,
        pad_token_id=0,
        dtype="float32",
        **overrides,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in find_moe_layers(model):
            layer.router.weight.normal_(0.0, 2.0 / 32**0.5)
    return model


def test_ungated_experts_are_selected_and_grafted_exactly():
    model = tiny_nemotron_h()
    base_logits = logits(model)
    selections = selected(model)
    brute_force = select_experts(
        model, [{"input_ids": INPUT_IDS}], FlexConfig(), scoring="brute-force"
    )
    for index, selection in selections.items():
        assert selection.selected == brute_force[index].selected
    handle = graft(model, selections, FlexConfig())
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    for layer in find_moe_layers(model):
        expert = handle.grafts[layer.layer_index].grafted[0]
        assert expert.act_proj is None
        e = selections[layer.layer_index].selected[0]
        torch.testing.assert_close(expert(x), layer.expert_forward(x, e), rtol=1e-6, atol=1e-6)
    force_gate_output(model, 0.0)
    assert torch.equal(logits(model), base_logits)


def test_experts_in_a_latent_space_are_refused():
    model = tiny_nemotron_h(moe_latent_size=16)
    with pytest.raises(FlexError, match="latent space"):
        select_experts(model, [{"input_ids": INPUT_IDS}], FlexConfig())

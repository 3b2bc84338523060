"""Parameter roles and sharing policies: accounting is complete, training touches only what FLEx
allows (experts, routers and personal state never travel; frozen roles stay bitwise equal)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import FAMILIES, VOCAB, build_tiny
from torch import nn

from flexmoe.moe import find_moe_layers
from flexmoe.moe.roles import (
    Role,
    SharingPolicy,
    assign_roles,
    attention_linear_names,
    freeze_for,
    role_table,
    shared_parameter_names,
)

NEVER_SHARED = {Role.ROUTED_EXPERT, Role.ROUTER, Role.PERSONAL}


class PersonalExpert(nn.Module):
    """Stand-in for a grafted expert + gate as the flex package adds them (marked personal)."""

    def __init__(self, hidden: int):
        super().__init__()
        self._flexmoe_personal = True
        self.w_in = nn.Linear(hidden, 16, bias=False)
        self.w_out = nn.Linear(16, hidden, bias=False)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.score(x)) * self.w_out(torch.relu(self.w_in(x)))


class WithPersonalExpert(nn.Module):
    """Adds the personal expert's output to a MoE block (keeps the block's tuple outputs)."""

    def __init__(self, block: nn.Module, hidden: int):
        super().__init__()
        self.block = block
        self.personal = PersonalExpert(hidden)

    def forward(self, x: torch.Tensor):
        out = self.block(x)
        if isinstance(out, tuple):
            return (out[0] + self.personal(x), *out[1:])
        return out + self.personal(x)


def _with_personal_experts(model: nn.Module) -> nn.Module:
    for layer in find_moe_layers(model):
        parent_path, _, attribute = layer.path.rpartition(".")
        wrapped = WithPersonalExpert(layer.block, layer.hidden_size)
        setattr(model.get_submodule(parent_path), attribute, wrapped)
    return model


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_roles_cover_every_parameter_once(family, tied):
    model = build_tiny(family, tie_word_embeddings=tied)
    roles = assign_roles(model)
    assert list(roles) == [name for name, _ in model.named_parameters()]
    table = role_table(model)
    unique = {id(p): p for p in model.parameters()}.values()
    assert sum(s.numel for s in table.values()) == sum(p.numel() for p in unique)
    assert sum(s.bytes for s in table.values()) == sum(4 * p.numel() for p in unique)
    assert sum(s.count for s in table.values()) == len(unique)
    assert table[Role.OTHER].count == 0
    vocab_matrix = VOCAB * model.config.hidden_size
    assert table[Role.EMBEDDING].numel == vocab_matrix * (1 if tied else 2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_roles_follow_module_ownership(family):
    model = build_tiny(family)
    roles = assign_roles(model)
    params = dict(model.named_parameters())
    layers = find_moe_layers(model)
    for layer in layers:
        for param in layer.experts.parameters():
            assert roles[_name_of(params, param)] is Role.ROUTED_EXPERT
        for param in layer.router.parameters():
            assert roles[_name_of(params, param)] is Role.ROUTER
        for shared in layer.shared_experts:
            for param in shared.parameters():
                assert roles[_name_of(params, param)] is Role.SHARED_EXPERT
    expert_numel = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    assert role_table(model)[Role.ROUTED_EXPERT].numel == expert_numel
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            assert all(roles[f"{name}.{n}"] is Role.NORM for n, _ in module.named_parameters())
    assert roles["lm_head.weight"] is Role.EMBEDDING
    # every decoder layer has attention; every q/k/v projection outside norms is attention
    for i in range(model.config.num_hidden_layers):
        attention = [n for n, r in roles.items() if f"layers.{i}." in n and r is Role.ATTENTION]
        assert attention


def _name_of(params: dict, param: torch.Tensor) -> str:
    return next(name for name, p in params.items() if p is param)


def test_dense_layers_of_moe_models_are_dense_mlp():
    qwen = assign_roles(build_tiny("qwen2_moe"))
    assert {r for n, r in qwen.items() if ".layers.1.mlp." in n} == {Role.DENSE_MLP}
    assert qwen["model.layers.0.mlp.shared_expert_gate.weight"] is Role.SHARED_EXPERT
    deepseek = assign_roles(build_tiny("deepseek_v3"))
    assert {r for n, r in deepseek.items() if ".layers.0.mlp." in n} == {Role.DENSE_MLP}
    # multi-head latent attention's inner norms are norms, its projections attention
    assert deepseek["model.layers.1.self_attn.kv_a_layernorm.weight"] is Role.NORM
    assert deepseek["model.layers.1.self_attn.kv_b_proj.weight"] is Role.ATTENTION
    granite = assign_roles(build_tiny("granitemoeshared"))
    assert granite["model.layers.0.shared_mlp.input_linear.weight"] is Role.SHARED_EXPERT


def test_personal_modules_and_their_lora_are_personal():
    model = _with_personal_experts(build_tiny("qwen2_moe"))
    assert all(not isinstance(m, PersonalExpert) for m in find_moe_layers(model)[0].shared_experts)
    targets = [*attention_linear_names(model), "personal.w_in", "personal.w_out"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    roles = assign_roles(model)
    personal = {n for n, r in roles.items() if r is Role.PERSONAL}
    assert personal and all(".personal." in n for n in personal)
    assert any("lora_A" in n for n in personal) and any("score" in n for n in personal)
    lora = shared_parameter_names(model, "lora")
    assert lora and all(roles[n] is Role.ATTENTION and ".lora_" in n for n in lora)
    with_shared = shared_parameter_names(model, SharingPolicy("lora", include_shared_expert=True))
    assert with_shared == lora  # no LoRA on the shared expert: nothing more to ship


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2", "granitemoeshared"])
def test_policies_pick_their_roles_and_never_experts_routers_or_personal(family):
    model = _with_personal_experts(build_tiny(family))
    roles = assign_roles(model)
    attention = shared_parameter_names(model)
    assert {roles[n] for n in attention} == {Role.ATTENTION}
    non_expert = shared_parameter_names(model, "non_expert")
    dense_roles = {Role.ATTENTION, Role.NORM, Role.EMBEDDING}
    if family != "granitemoeshared":
        dense_roles.add(Role.DENSE_MLP)
    assert {roles[n] for n in non_expert} == dense_roles
    with_shared = shared_parameter_names(model, SharingPolicy("non_expert", True))
    assert {roles[n] for n in with_shared} == dense_roles | {Role.SHARED_EXPERT}
    assert not {roles[n] for n in with_shared} & NEVER_SHARED
    with pytest.raises(ValueError, match="no LoRA adapters"):
        shared_parameter_names(model, "lora")
    with pytest.raises(ValueError, match="unknown sharing policy"):
        SharingPolicy("everything")


def _train_one_step(model: nn.Module, policy, optimizer_class) -> tuple[dict, dict, list[str]]:
    trainable = freeze_for(model, policy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = optimizer_class(model.parameters(), lr=1e-2)
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = {n: p.detach() for n, p in model.named_parameters()}
    return before, after, trainable


@pytest.mark.parametrize(
    ("family", "policy", "optimizer_class"),
    [
        ("qwen2_moe", SharingPolicy("attention"), torch.optim.AdamW),
        ("qwen2_moe", SharingPolicy("non_expert", include_shared_expert=True), torch.optim.SGD),
        ("deepseek_v3", SharingPolicy("non_expert"), torch.optim.AdamW),
        ("phimoe", SharingPolicy("attention"), torch.optim.SGD),
    ],
)
def test_a_training_step_moves_only_shared_and_personal_parameters(family, policy, optimizer_class):
    model = _with_personal_experts(build_tiny(family))
    before, after, trainable = _train_one_step(model, policy, optimizer_class)
    roles = assign_roles(model)
    shared = set(shared_parameter_names(model, policy))
    assert set(trainable) == shared | {n for n, r in roles.items() if r is Role.PERSONAL}
    for name, role in roles.items():
        moved = not torch.equal(before[name], after[name])
        if name in trainable:
            assert moved, f"{name} ({role.value}) should have trained"
        else:
            assert not moved, f"{name} ({role.value}) must stay frozen"
    frozen_roles = {roles[n] for n in roles if n not in trainable}
    assert {Role.ROUTED_EXPERT, Role.ROUTER} <= frozen_roles
    if not policy.include_shared_expert and family != "phimoe":
        assert Role.SHARED_EXPERT in frozen_roles


def test_lora_policy_trains_adapters_and_the_personal_gate_but_no_base_weight():
    model = _with_personal_experts(build_tiny("olmoe"))
    targets = [*attention_linear_names(model), "personal.w_in", "personal.w_out"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    before, after, trainable = _train_one_step(model, "lora", torch.optim.SGD)
    roles = assign_roles(model)
    for name in roles:
        moved = not torch.equal(before[name], after[name])
        # lora_B starts at zero, so one SGD step moves only B (and the personal gate)
        expected = name in trainable and ("lora_B" in name or name.endswith("score.weight"))
        assert moved == expected, name
    personal_trainable = [n for n in trainable if roles[n] is Role.PERSONAL]
    assert all(".lora_" in n or n.endswith("score.weight") for n in personal_trainable)
    assert not any("base_layer" in n for n in trainable)
    # a full-parameter sharing policy keeps the LoRA-wrapped personal copies frozen too
    trainable = freeze_for(model, "attention")
    assert not any(roles[n] is Role.PERSONAL and "base_layer" in n for n in trainable)
    assert any(roles[n] is Role.PERSONAL and "lora_B" in n for n in trainable)


def test_attention_linear_names_are_attention_projections():
    names = attention_linear_names(build_tiny("deepseek_v2"))
    assert "model.layers.0.self_attn.kv_b_proj" in names
    assert all(".self_attn." in n for n in names)

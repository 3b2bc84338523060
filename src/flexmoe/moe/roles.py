"""Parameter roles: which tensors FLEx freezes, shares with the server, or keeps on the client.

A tensor's role is decided by the module that owns it, never by its name: the routed experts and
router of every MoE block (from `find_moe_layers`), the shared experts, the model's input/output
embeddings, norm modules, the attention modules transformers declares for the model, the MLPs of
dense layers inside the MoE stack, and anything under a module flexmoe added and marked personal
(`module._flexmoe_personal = True`: the grafted expert and its gate, with any LoRA on them).
A sharing policy then picks the roles that travel each round; experts, routers and personal
parameters never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from torch import nn

from flexmoe.moe.adapter import PERSONAL_ATTRIBUTE, MoELayer, find_moe_layers, peft_base


class Role(StrEnum):
    ROUTED_EXPERT = "routed_expert"
    ROUTER = "router"
    SHARED_EXPERT = "shared_expert"
    ATTENTION = "attention"
    NORM = "norm"
    EMBEDDING = "embedding"  # input embeddings and lm_head
    DENSE_MLP = "dense_mlp"  # MLPs of the dense layers of a MoE model
    PERSONAL = "personal"
    OTHER = "other"  # e.g. the Mamba mixers of hybrid models


@dataclass(frozen=True)
class RoleStats:
    count: int  # number of tensors
    numel: int
    bytes: int


@dataclass(frozen=True)
class SharingPolicy:
    """What a FLEx round ships to the server.

    - "attention" (the paper's default): the attention weights.
    - "non_expert": attention, norms, embeddings/lm_head and dense-layer MLPs.
    - "lora": the LoRA adapter tensors (peft) on attention modules.
    `include_shared_expert` adds the always-on shared experts (their weights, or their LoRA
    adapters under "lora"). Routed experts, routers and personal parameters are never shared.
    """

    kind: Literal["attention", "non_expert", "lora"] = "attention"
    include_shared_expert: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("attention", "non_expert", "lora"):
            raise ValueError(
                f"unknown sharing policy {self.kind!r}: choose 'attention', 'non_expert' or 'lora'"
            )

    @property
    def roles(self) -> frozenset[Role]:
        roles = {Role.ATTENTION}
        if self.kind == "non_expert":
            roles |= {Role.NORM, Role.EMBEDDING, Role.DENSE_MLP}
        if self.include_shared_expert:
            roles.add(Role.SHARED_EXPERT)
        return frozenset(roles)


def assign_roles(model: nn.Module) -> dict[str, Role]:
    """Role of every parameter, by name (tied tensors appear once, under their first name)."""
    owner_role = _roles_by_tensor(model)
    return {name: owner_role[id(param)] for name, param in model.named_parameters()}


def role_table(model: nn.Module) -> dict[Role, RoleStats]:
    """Tensor count, elements and bytes per role (every role listed; tied tensors counted once)."""
    params = dict(model.named_parameters())
    roles = assign_roles(model)
    table = {}
    for role in Role:
        members = [params[name] for name, r in roles.items() if r is role]
        table[role] = RoleStats(
            count=len(members),
            numel=sum(p.numel() for p in members),
            bytes=sum(p.numel() * p.element_size() for p in members),
        )
    return table


def shared_parameter_names(
    model: nn.Module, policy: SharingPolicy | str = "attention"
) -> list[str]:
    """Names of the parameters a FLEx round aggregates under `policy`, in model order."""
    policy = SharingPolicy(policy) if isinstance(policy, str) else policy
    roles = assign_roles(model)
    adapters = _adapter_tensor_ids(model)
    params = dict(model.named_parameters())
    if policy.kind == "lora":
        names = [n for n, r in roles.items() if r in policy.roles and id(params[n]) in adapters]
        if not names:
            raise ValueError(
                "sharing policy 'lora' found no LoRA adapters on attention modules: wrap the "
                "model with peft first (e.g. LoraConfig(target_modules=attention_linear_names("
                "model))), or use the 'attention' policy to share the attention weights themselves"
            )
        return names
    return [n for n, r in roles.items() if r in policy.roles and id(params[n]) not in adapters]


def freeze_for(
    model: nn.Module, policy: SharingPolicy | str = "attention", train_personal: bool = True
) -> list[str]:
    """Make only the shared (and, if `train_personal`, personal) parameters trainable.

    Whatever the policy, the base weights of a LoRA-wrapped personal layer stay frozen (the
    grafted expert's copied weights in the LoRA regime, as peft intends) while its adapters and
    the other personal tensors (the graft's gate) train. Returns the trainable parameter names.
    """
    policy = SharingPolicy(policy) if isinstance(policy, str) else policy
    trainable = set(shared_parameter_names(model, policy))
    if train_personal:
        lora_bases = _lora_base_tensor_ids(model)
        trainable |= {
            name
            for name, role in assign_roles(model).items()
            if role is Role.PERSONAL and id(model.get_parameter(name)) not in lora_bases
        }
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return [name for name, _ in model.named_parameters() if name in trainable]


def attention_linear_names(model: nn.Module) -> list[str]:
    """Module names of the Linear layers inside attention modules: peft LoRA targets for the
    'lora' policy that peft's MoE target rewriting leaves alone."""
    roles = _roles_by_tensor(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and roles.get(id(module.weight)) is Role.ATTENTION
    ]


def _roles_by_tensor(model: nn.Module) -> dict[int, Role]:
    """Role per parameter id; the first claim wins, in the order below (most specific first)."""
    roles: dict[int, Role] = {}

    def claim(module: nn.Module, role: Role) -> None:
        for param in module.parameters():
            roles.setdefault(id(param), role)

    for module in model.modules():
        if getattr(module, PERSONAL_ATTRIBUTE, False):
            claim(module, Role.PERSONAL)
    layers = find_moe_layers(model)
    for layer in layers:
        for child in layer.block.children():  # the block's own slots, incl. any peft wrapper
            if peft_base(child) is layer.experts:
                claim(child, Role.ROUTED_EXPERT)
            elif peft_base(child) is layer.router:
                claim(child, Role.ROUTER)
        for shared in layer.shared_experts:
            claim(shared, Role.SHARED_EXPERT)
    for embedding in _embeddings(model):
        claim(embedding, Role.EMBEDDING)
    for module in model.modules():
        if _is_norm(module):
            claim(module, Role.NORM)
    for attention in _attention_modules(model):
        claim(attention, Role.ATTENTION)
    for dense_mlp in _dense_mlps(model, layers):
        claim(dense_mlp, Role.DENSE_MLP)
    claim(model, Role.OTHER)
    return roles


def _embeddings(model: nn.Module) -> list[nn.Module]:
    """The model's input and output embeddings (lm_head), and any other embedding table."""
    declared = [
        getattr(model, getter)()
        for getter in ("get_input_embeddings", "get_output_embeddings")
        if hasattr(model, getter)
    ]
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return [m for m in declared if m is not None] + tables


def _is_norm(module: nn.Module) -> bool:
    """Norm layers by type: torch's norm classes, or a family's own `*Norm` class (RMSNorm)."""
    torch_norms = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
    return isinstance(module, torch_norms) or type(module).__name__.endswith("Norm")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules transformers records as the model's attentions (its `_can_record_outputs`);
    for models that declare none, modules whose class is named `*Attention`."""
    classes: set[type] = set()
    for module in model.modules():
        declared = (getattr(module, "_can_record_outputs", None) or {}).get("attentions")
        for entry in declared if isinstance(declared, list | tuple) else [declared]:
            target = getattr(entry, "target_class", entry)
            if isinstance(target, type):
                classes.add(target)
    if classes:
        return [m for m in model.modules() if isinstance(m, tuple(classes))]
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def _dense_mlps(model: nn.Module, layers: list[MoELayer]) -> list[nn.Module]:
    """In decoder layers without a MoE block, the child where the others hold their block
    (Qwen2-MoE's `mlp_only_layers`, DeepSeek's first dense layers)."""
    dense = []
    blocks = {id(layer.block) for layer in layers}
    for layer_list_path, attribute in {_slot(layer) for layer in layers}:
        for decoder_layer in model.get_submodule(layer_list_path).children():
            mlp = decoder_layer._modules.get(attribute)
            if mlp is not None and not any(id(m) in blocks for m in mlp.modules()):
                dense.append(mlp)
    return dense


def _slot(layer: MoELayer) -> tuple[str, str]:
    """('model.layers', 'mlp'): the list of decoder layers and the attribute holding the block."""
    layer_list_path = layer.decoder_layer_path.rpartition(".")[0]
    attribute = layer.path[len(layer.decoder_layer_path) + 1 :].split(".")[0]
    return layer_list_path, attribute


def _adapter_tensor_ids(model: nn.Module) -> set[int]:
    """Ids of peft adapter tensors (lora_A/lora_B/...: each tuner layer's `adapter_layer_names`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # peft is only needed when present

    ids = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attribute in module.adapter_layer_names:
                ids |= {id(p) for p in getattr(module, attribute).parameters()}
    return ids


def _lora_base_tensor_ids(model: nn.Module) -> set[int]:
    """Ids of the frozen base weights wrapped by peft tuner layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        id(p)
        for module in model.modules()
        if isinstance(module, BaseTunerLayer)
        for p in module.get_base_layer().parameters()
    }

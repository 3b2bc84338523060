"""The MoE adapter (blocks, routers, experts, routing of any transformers MoE family) and the
roles of parameters (what FLEx trains, shares, keeps personal or freezes)."""

from flexmoe.moe.adapter import (
    PERSONAL_ATTRIBUTE,
    SUPPORTED_FAMILIES,
    MoELayer,
    UnsupportedModelError,
    describe,
    find_moe_layers,
)
from flexmoe.moe.roles import (
    Role,
    RoleStats,
    SharingPolicy,
    assign_roles,
    attention_linear_names,
    freeze_for,
    role_table,
    shared_parameter_names,
)
from flexmoe.moe.routing import RoutingSpec

__all__ = [
    "PERSONAL_ATTRIBUTE",
    "SUPPORTED_FAMILIES",
    "MoELayer",
    "Role",
    "RoleStats",
    "RoutingSpec",
    "SharingPolicy",
    "UnsupportedModelError",
    "assign_roles",
    "attention_linear_names",
    "describe",
    "find_moe_layers",
    "freeze_for",
    "role_table",
    "shared_parameter_names",
]

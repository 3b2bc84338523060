"""FLEx core: select experts on a client's local data, graft trainable copies beside the MoE
blocks with sigmoid gates, and keep them as the client's personal state.

Laid out like a peft method: `config` (options), `selection` (which experts), `layer` (the
grafted expert and gate modules), `model` (attaching them to a model), `personal_state`
(saving/loading the personal tensors). No federation here: see `flexmoe.federated`.
"""

from flexmoe.flex.config import FlexConfig
from flexmoe.flex.errors import FlexError, PersonalStateMismatchError
from flexmoe.flex.layer import FlexGraft, GraftedExpert, GraftGate
from flexmoe.flex.model import (
    GraftHandle,
    find_grafts,
    force_gate_output,
    graft,
    personal_parameter_names,
    remove_graft,
)
from flexmoe.flex.personal_state import (
    load_personal_state,
    read_personal_metadata,
    save_personal_state,
)
from flexmoe.flex.selection import LayerSelection, select_experts

__all__ = [
    "FlexConfig",
    "FlexError",
    "FlexGraft",
    "GraftGate",
    "GraftHandle",
    "GraftedExpert",
    "LayerSelection",
    "PersonalStateMismatchError",
    "find_grafts",
    "force_gate_output",
    "graft",
    "load_personal_state",
    "personal_parameter_names",
    "read_personal_metadata",
    "remove_graft",
    "save_personal_state",
    "select_experts",
]

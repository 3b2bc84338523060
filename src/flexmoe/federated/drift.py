"""Routing drift over rounds, measured by every client on its own data.

The routers stay frozen (FLEx) or are fine-tuned with everything else (the baselines) while the
layers below them change: does the routing move away from the base model's, and when? After its
local training in every round, a client routes a small fixed probe (the first
`eval.drift_samples` prompts of its own test split, cut as at evaluation) through its model and
compares each MoE layer's expert load with the base model's load on the same probe (Jensen-Shannon
divergence in bits, see `flexmoe.evaluation.routing`). Only two train metrics leave the client:
`routing_js` (the mean over MoE layers) and `routing_js_layers` (one value per MoE layer).

The base model's profile is taken once per client and kept in its state store
(`base-routing.json`), where a resumed run, or a ClientApp started as a new process per message,
finds it. In a client's first round (restore round 0), once the server's shared tensors and the
client's personal state are in place, the model it is about to train computes exactly the base
model's function: the first shared tensors the server sends are the base weights (every weight
for the "MoE + X" baselines), `local` starts from the base weights, no other parameter has been
trained yet, and a fresh graft is switched off by forcing its gates to output 0 (every logit is
then bitwise the base model's). So it is profiled there. A client first sampled in a later round
(partial participation) profiles a fresh copy of the base checkpoint instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from flexmoe.data.prompting import encode_prompt
from flexmoe.evaluation.routing import (
    RoutingProfile,
    prompt_batches,
    routing_profile,
    routing_summary,
)
from flexmoe.federated.client_state import ClientStateStore
from flexmoe.federated.config import RunConfig
from flexmoe.federated.partition import ClientData
from flexmoe.flex import find_grafts, force_gate_output
from flexmoe.models.loading import DTYPES, load_model
from flexmoe.runtime import console

BASE_PROFILE_FILE = "base-routing.json"


class DriftProbeError(ValueError):
    """Routing drift cannot be measured on this client; the message says what to change."""


@dataclass(frozen=True)
class DriftProbe:
    """What a client routes to measure its drift: its first `samples` test prompts."""

    samples: int
    prompt_length: int
    batch_size: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> DriftProbe | None:
        """The run's probe, or None when drift is not measured (`eval.drift_samples = 0`, or no
        client holds test items: `data.test_per_client = 0`)."""
        if cfg.eval.drift_samples == 0 or cfg.data.test_per_client == 0:
            return None
        return cls(cfg.eval.drift_samples, cfg.prompt_length, cfg.eval.batch_size)

    def batches(self, data: ClientData, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
        """The client's probe as padded batches (the same every round)."""
        records = data.test[: self.samples]
        if not records:
            raise DriftProbeError(
                f"client {data.client_id} ({data.name}) has no test items to measure routing "
                "drift on: give it a test split, or set eval.drift_samples=0"
            )
        prompts = [encode_prompt(r, tokenizer, self.prompt_length) for r in records]
        return prompt_batches(prompts, tokenizer, self.batch_size)

    def identity(self, data: ClientData, model_source: str) -> dict:
        """What a stored base profile was taken on; any difference means it must be retaken."""
        return {
            "model": model_source,
            "records": [r.id for r in data.test[: self.samples]],
            "prompt_length": self.prompt_length,
        }


def base_profile(
    store: ClientStateStore,
    identity: dict,
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    *,
    model_is_base: bool,
    model_source: str,
) -> RoutingProfile:
    """The base model's routing on the client's probe: read from its store, else taken and stored.

    `model_is_base`: `model` holds the base weights (the client's first round, see the module
    docstring) and is profiled with its graft switched off; otherwise a fresh copy of the base
    checkpoint `model_source` is loaded, with `model`'s dtype and device.
    """
    path = store.root / BASE_PROFILE_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["probe"] == identity:
            return RoutingProfile.from_dict(saved["profile"])
    if model_is_base:
        profile = _profile_without_graft(model, batches)
    else:
        console.log("routing drift: loading the base model once to profile this client's probe")
        profile = routing_profile(_load_base(model_source, model), batches, progress=False)
    store.root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps({"probe": identity, "profile": profile.to_dict()}) + "\n", encoding="utf-8"
    )
    tmp.replace(path)
    return profile


def drift_metrics(
    model: nn.Module, batches: list[dict[str, Tensor]], base: RoutingProfile
) -> dict[str, float | list[float]]:
    """JS divergence (bits) of `model`'s expert load on the probe from the base model's: the
    mean over MoE layers (`routing_js`) and each layer's, in model order (`routing_js_layers`)."""
    summary = routing_summary(routing_profile(model, batches, progress=False), base)
    return {
        "routing_js": summary["mean"]["js_from_reference_bits"],
        "routing_js_layers": [row["js_from_reference_bits"] for row in summary["layers"]],
    }


def _profile_without_graft(model: nn.Module, batches: list[dict[str, Tensor]]) -> RoutingProfile:
    """`model`'s routing with its grafts' gates forced to 0, i.e. the model it was grafted on."""
    if not find_grafts(model):
        return routing_profile(model, batches, progress=False)
    force_gate_output(model, 0.0)
    try:
        profile = routing_profile(model, batches, progress=False)
    finally:
        force_gate_output(model, None)
    return replace(profile, gate_means={})  # the base model has no graft


def _load_base(source: str, like: nn.Module) -> nn.Module:
    """A fresh copy of the base checkpoint, with the dtype and device of the run's model."""
    param = next(like.parameters())
    dtype = next(name for name, value in DTYPES.items() if value == param.dtype)
    return load_model(source, dtype=dtype, device=str(param.device), require_tokenizer=False).model

"""Read a finished `flexmoe run` directory and rebuild the model every client evaluated.

A run directory keeps, per method M, the final aggregated shared tensors (`M/final_shared.npz`)
and each client's node-local state (`state/<run name>/M/client-<i>/round-<r>/`). Client i's
model is rebuilt the way `task.evaluate_client` assembled it for the final evaluation:
1. the run's base checkpoint (`task.model_source`), with the run's dtype and device;
2. attention LoRA adapters, for methods that share through LoRA (`sharing = "lora"`);
3. the final shared tensors (every parameter for the "MoE + X" baselines, nothing for `local`);
4. the client's own state of its newest round <= the last: its FLEx personal state (grafted
   experts and gates) or, for `local`, all of its trained parameters.
Every call loads a fresh model, so models returned earlier are never changed behind the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from flexmoe.data.records import InstructionRecord
from flexmoe.evaluation.generation import generate_responses
from flexmoe.federated import task
from flexmoe.federated.base_model import check_base_model
from flexmoe.federated.client_state import state_name
from flexmoe.federated.config import RunConfig
from flexmoe.federated.messages import decode_run_config
from flexmoe.federated.methods import METHODS, Method, resolve_methods
from flexmoe.federated.partition import ClientData
from flexmoe.flex import load_personal_state
from flexmoe.models.loading import LoadedModel, load_model
from flexmoe.moe.roles import SharingPolicy, shared_parameter_names

CONFIG_FILE = "config.resolved.json"


class RunArtifactError(ValueError):
    """A run directory, method or client that cannot be read as asked; says what to do instead."""


@dataclass(frozen=True)
class ClientInfo:
    id: int
    """The client's partition id (`client-<id>` in the state directory)."""
    name: str
    """What it holds: its category, domain or `client-<id>`."""

    def __str__(self) -> str:
        return f"{self.id} ({self.name})"


class RunArtifacts:
    """The configuration, methods, clients and models of one run directory."""

    def __init__(self, run_dir: str | Path, *, state_dir: str | Path | None = None) -> None:
        """`state_dir`: where the clients kept their state, if not `run_dir/state` (a deployed
        run keeps it on each node: copy the nodes' state directories together and pass it)."""
        self.run_dir = Path(run_dir)
        config_file = self.run_dir / CONFIG_FILE
        if not config_file.is_file():
            raise RunArtifactError(
                f"{self.run_dir} is not a flexmoe run directory: it has no {CONFIG_FILE} "
                "(written by `flexmoe run --out DIR`)"
            )
        self.config: RunConfig = decode_run_config(config_file.read_text(encoding="utf-8"))
        check_base_model(self.run_dir, self.config)
        self.state_dir = Path(state_dir) if state_dir is not None else self.run_dir / "state"
        self.run_name = state_name(self.run_dir)
        """The name the runtime filed client state under (the run directory's name)."""

    # ------------------------------------------------------------ what the run holds

    @property
    def final_round(self) -> int:
        return self.config.train.rounds

    @property
    def methods(self) -> list[str]:
        """The run's methods that finished (have a result.json), in the run's order."""
        return [m.name for m in resolve_methods(self.config.methods) if self._finished(m.name)]

    @cached_property
    def clients(self) -> list[ClientInfo]:
        """The run's clients by partition id, named as in the methods' results."""
        finished = self.methods
        if not finished:
            raise RunArtifactError(self._unfinished_message())
        clients = self.result(finished[0])["clients"]
        return sorted(
            (ClientInfo(int(pid), entry["name"]) for pid, entry in clients.items()),
            key=lambda c: c.id,
        )

    def client(self, client: int | str) -> ClientInfo:
        """A client by partition id (int or digits) or by name (e.g. `closed_qa`)."""
        for info in self.clients:
            if client == info.id or str(client) in (str(info.id), info.name):
                return info
        known = ", ".join(str(c) for c in self.clients)
        raise RunArtifactError(f"no client {client!r} in run {self.run_dir}; its clients: {known}")

    def method(self, name: str) -> Method:
        """A finished method of this run, or a RunArtifactError saying why it is not available."""
        ran = [m.name for m in resolve_methods(self.config.methods)]
        if name not in ran:
            known = "" if name in METHODS else " (not a flexmoe method)"
            raise RunArtifactError(
                f"method {name!r}{known} is not part of run {self.run_dir}; it ran: {', '.join(ran)}"
            )
        if not self._finished(name):
            raise RunArtifactError(self._unfinished_message(name))
        return METHODS[name]

    def result(self, method: str) -> dict:
        """The method's `result.json`: per-client metrics, communication, timings."""
        self.method(method)
        return json.loads((self.run_dir / method / "result.json").read_text(encoding="utf-8"))

    def client_data(self, client: int | str) -> ClientData:
        """The client's train/test split as the run partitioned it (simulated clients; a deployed
        client's data lives on its own node)."""
        return task.client_data(self.config, self.client(client).id, None)

    def client_state(self, method: str, client: int | str) -> Path | None:
        """The client's state directory of its newest round <= the last (None: never trained)."""
        info, m = self.client(client), self.method(method)
        store = task.client_store(str(self.state_dir), self.run_name, m, info.id)
        if not store.root.is_dir():
            raise RunArtifactError(
                f"no state of client {info} for method {method} under {store.root}: pass "
                "state_dir= the directory the clients kept their state in (a deployed run keeps "
                "it on each node)"
            )
        return store.latest(self.final_round)

    def final_shared(self, method: str) -> dict[str, torch.Tensor]:
        """The final aggregated shared tensors by parameter name (empty for `local`)."""
        if not self.method(method).aggregates:
            return {}
        path = self.run_dir / method / "final_shared.npz"
        if not path.is_file():
            raise RunArtifactError(
                f"{path} is missing although {method} finished: the run directory is incomplete "
                "(its checkpoint/arrays.safetensors holds the same tensors)"
            )
        with np.load(path) as arrays:
            return {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}

    # ------------------------------------------------------------ models

    def client_model(self, method: str, client: int | str) -> LoadedModel:
        """The model client `client` evaluated at the end of `method`: base + final shared
        tensors + its personal state (FLEx) or its own trained parameters (`local`)."""
        m, info = self.method(method), self.client(client)
        keeps_own = m.graft or not m.aggregates
        state = self.client_state(method, info.id) if keeps_own else None
        loaded = self._shared_model(m)
        if m.graft:
            if state is None:
                raise RunArtifactError(
                    f"client {info} has no personal state for {method} (it never trained, so it "
                    "could not be evaluated either)"
                )
            load_personal_state(loaded.model, state / "personal")
        elif not m.aggregates and state is not None:
            _copy_parameters(loaded.model, load_file(state / "local.safetensors"), method)
        loaded.model.eval()
        return loaded

    def global_model(self, method: str) -> LoadedModel:
        """Base + the final aggregated tensors, with no client's personal part.

        For the "MoE + X" baselines and `fedit` this is every client's model; for FLEx methods it
        is the shared model a client grafts onto (no grafted expert). `local` has none.
        """
        m = self.method(method)
        if not m.aggregates:
            raise RunArtifactError(
                f"method {method} aggregates nothing, so it has no global model: every client "
                "has its own (use client_model)"
            )
        return self._shared_model(m)

    def _shared_model(self, method: Method) -> LoadedModel:
        """The base model with the method's final shared tensors, in eval mode."""
        cfg = self.config
        loaded = load_model(task.model_source(cfg), dtype=cfg.dtype, device=cfg.device)
        model = loaded.model
        if method.trains == "all":
            expected = [name for name, _ in model.named_parameters()]
        else:
            policy = SharingPolicy(cfg.sharing, include_shared_expert=cfg.include_shared_expert)
            if policy.kind == "lora":
                task.add_attention_lora(model, cfg)
            expected = shared_parameter_names(model, policy)
        shared = self.final_shared(method.name)
        if method.aggregates:
            if set(shared) != set(expected):
                missing = sorted(set(expected) - set(shared))[:3]
                extra = sorted(set(shared) - set(expected))[:3]
                raise RunArtifactError(
                    f"{method.name}'s final shared tensors do not fit the base model "
                    f"{task.model_source(cfg)} (missing {missing}, unexpected {extra}): was the "
                    "model directory changed after the run?"
                )
            _copy_parameters(model, shared, method.name)
        model.eval()
        return loaded

    def _finished(self, method: str) -> bool:
        return (self.run_dir / method / "result.json").is_file()

    def _unfinished_message(self, method: str | None = None) -> str:
        resume = f"continue it with `flexmoe run --resume {self.run_dir}`"
        if method is None:
            return f"no method of run {self.run_dir} has finished yet: {resume}"
        meta = self.run_dir / method / "checkpoint" / "meta.json"
        done = json.loads(meta.read_text())["round"] if meta.is_file() else 0
        return (
            f"method {method} of run {self.run_dir} has not finished (round {done} of "
            f"{self.final_round} done): {resume}"
        )


def _copy_parameters(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy `tensors` into the model's parameters of the same names (as the runtime does)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise RunArtifactError(
            f"{what}: {len(unknown)} saved tensor(s) are not parameters of the base model "
            f"(e.g. {unknown[0]}): was the model directory changed after the run?"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def generate_text(
    run_dir: str | Path,
    method: str,
    client: int | str,
    prompt: str,
    max_new_tokens: int = 128,
    context: str = "",
    *,
    state_dir: str | Path | None = None,
) -> str:
    """Client `client`'s model of `method` answers `prompt` (Alpaca template, greedy decoding).

    The prompt is cut as at evaluation, to the run's `max_length` minus `max_new_tokens` (at
    least half of `max_length`).
    """
    artifacts = RunArtifacts(run_dir, state_dir=state_dir)
    loaded = artifacts.client_model(method, client)
    max_length = artifacts.config.train.max_length
    record = InstructionRecord(instruction=prompt, response="", context=context)
    (answer,) = generate_responses(
        loaded.model,
        loaded.tokenizer,
        [record],
        max_new_tokens=max_new_tokens,
        max_prompt_length=max(max_length - max_new_tokens, max_length // 2),
    )
    return answer

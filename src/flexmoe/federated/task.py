"""Everything ML a federated client does — model, data, train, evaluate — with no Flower in it.

The Flower layer (`client_app.py`) only moves arrays and configs in and out of these functions.
One base model is loaded per process and shared by every client simulated in it: a client swaps
in the aggregated shared tensors from the server and its own personal tensors from its
node-local disk, trains, and hands back the shared tensors. Nothing else of the model changes,
because every other parameter is frozen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from flexmoe.data import (
    BUNDLED_INSTRUCTION_SETS,
    InstructionRecord,
    encode_dataset,
    load_instructions,
)
from flexmoe.data.prompting import EncodedExample
from flexmoe.evaluation.generation import generate_responses
from flexmoe.evaluation.rouge import rouge_f1
from flexmoe.federated import drift, scaffold
from flexmoe.federated.client_state import ClientStateStore
from flexmoe.federated.config import RunConfig
from flexmoe.federated.local_training import draw_batches, round_seed, train_local
from flexmoe.federated.methods import Method
from flexmoe.federated.partition import ClientData, Partition, make_partition
from flexmoe.flex import (
    FlexConfig,
    graft,
    load_personal_state,
    remove_graft,
    save_personal_state,
    select_experts,
)
from flexmoe.models.default_model import ensure_default_model
from flexmoe.models.loading import LoadedModel, load_model
from flexmoe.models.pretrain import read_metadata, seen_in_pretraining
from flexmoe.moe.roles import (
    Role,
    SharingPolicy,
    assign_roles,
    attention_linear_names,
    freeze_for,
    shared_parameter_names,
)


class PrivacyGuardError(RuntimeError):
    """A FLEx client was about to send an expert, router or personal tensor."""


# ---------------------------------------------------------------- model (one per process)


def model_source(cfg: RunConfig) -> str:
    return str(ensure_default_model()) if cfg.model == "default" else cfg.model


@dataclass
class MethodModel:
    """The process-wide model prepared for one method of one run: what is shared and trained."""

    key: tuple
    loaded: LoadedModel
    method: Method
    flex: FlexConfig
    policy: SharingPolicy
    shared: list[str]
    """Parameters aggregated by the server (empty for `local`)."""
    base_trainable: dict[str, torch.Tensor] | None
    """Base values of the parameters `local` keeps per client (each starts from the base)."""

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model


_current: MethodModel | None = None


def method_model(
    cfg: RunConfig, method: Method, run_name: str, *, fresh: bool = False
) -> MethodModel:
    """The process's model set up for `method` of run `run_name`.

    Loaded fresh from the checkpoint whenever the configuration, method or run changes (a
    baseline trains every weight, so nothing of a previous method may leak into the next), or
    when `fresh` (the server starting or resuming a method: clients of an earlier start in this
    process have trained the model); re-used by every client of the same method and run.
    """
    global _current
    source = model_source(cfg)
    key = (cfg.hash(), run_name, method.name)
    if _current is not None and _current.key == key and not fresh:
        return _current
    _current = None
    loaded = load_model(source, dtype=cfg.dtype, device=cfg.device)
    model = loaded.model
    flex = FlexConfig(**{**vars(cfg.flex), **method.flex_overrides, "seed": cfg.seed})
    policy = SharingPolicy(cfg.sharing, include_shared_expert=cfg.include_shared_expert)
    if method.trains == "all":
        names = [n for n, _ in model.named_parameters()]
        shared = names if method.aggregates else []
    else:
        if policy.kind == "lora":
            add_attention_lora(model, cfg)
        shared = shared_parameter_names(model, policy)
    keep_base = method.trains == "all" and not method.aggregates
    base = {n: p.detach().clone() for n, p in model.named_parameters()} if keep_base else None
    _current = MethodModel(key, loaded, method, flex, policy, shared, base)
    return _current


def add_attention_lora(model: torch.nn.Module, cfg: RunConfig) -> None:
    """The paper's shared part in the LoRA regime: LoRA adapters on the attention projections.

    Seeded, though every client overwrites the adapters with the server's in its first round.
    """
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.shared_lora_r,
        lora_alpha=cfg.shared_lora_alpha,
        lora_dropout=cfg.shared_lora_dropout,
        target_modules=attention_linear_names(model),
    )
    inject_adapter_in_model(lora, model)


def _restore(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def shared_tensors(mm: MethodModel) -> dict[str, torch.Tensor]:
    """The tensors a client sends: refuses, in the FLEx path, anything expert/router/personal."""
    if mm.method.trains == "shared":
        roles = assign_roles(mm.model)
        leaked = [
            n for n in mm.shared if roles[n] in (Role.ROUTED_EXPERT, Role.ROUTER, Role.PERSONAL)
        ]
        if leaked:
            raise PrivacyGuardError(
                f"refusing to send {len(leaked)} private tensor(s) (e.g. {leaked[0]}, role "
                f"{roles[leaked[0]]}): FLEx never shares experts, routers or personal tensors"
            )
    params = dict(mm.model.named_parameters())
    return {n: params[n].detach().float().cpu() for n in mm.shared}


def load_shared(mm: MethodModel, tensors: dict[str, torch.Tensor]) -> None:
    if set(tensors) != set(mm.shared):
        raise ValueError("the server sent a different set of shared tensors than this method uses")
    _restore(mm.model, tensors)


# ---------------------------------------------------------------- data (cached per process)


@cache
def _partition(
    source: str,
    strategy: str,
    clients: int,
    categories: tuple[str, ...],
    alpha: float,
    test_per_client: int,
    seed: int,
    field_map: str,
    pretrain_share: float | None,
) -> Partition:
    records = load_instructions(source, field_map=json.loads(field_map) or None)
    return make_partition(
        records,
        strategy,
        num_clients=clients,
        categories=categories,
        alpha=alpha,
        test_per_client=test_per_client,
        seed=seed,
        test_eligible=(
            None
            if pretrain_share is None
            else lambda r: not seen_in_pretraining(r.id, pretrain_share)
        ),
    )


def pretraining_share(cfg: RunConfig) -> float | None:
    """The share of the bundled instruction data a flexmoe-pretrained base model saw (None for
    other models, and for the user's own data, which no flexmoe model was pretrained on).

    Test items are then drawn only from records it never saw, so ROUGE measures generalisation.
    """
    if cfg.data.source not in BUNDLED_INSTRUCTION_SETS:
        return None
    metadata = read_metadata(Path(model_source(cfg)))
    return None if metadata is None else metadata["data"]["instruction_share"]


def partition_for(cfg: RunConfig) -> Partition:
    d = cfg.data
    # domains, FedIT clients and named categories fix the number of clients themselves
    fixed = d.partition in ("domain", "natural") or (
        d.partition == "pathological" and bool(d.categories)
    )
    n = None if fixed else d.clients
    return _partition(
        d.source,
        d.partition,
        n,
        tuple(d.categories),
        d.alpha,
        d.test_per_client,
        cfg.seed,
        json.dumps(d.field_map, sort_keys=True),
        pretraining_share(cfg),
    )


def client_data(cfg: RunConfig, partition_id: int, data_dir: str | None) -> ClientData:
    """This client's data: from its node's `data-dir` (deployment) or the run's partition."""
    if data_dir:
        path = Path(data_dir)
        return ClientData(
            partition_id,
            path.name,
            load_instructions(str(path / "train.jsonl")),
            load_instructions(str(path / "test.jsonl")),
        )
    return partition_for(cfg).clients[partition_id]


_encoded: dict[tuple, tuple[tuple[InstructionRecord, ...], list[EncodedExample]]] = {}


def encoded_train(mm: MethodModel, data: ClientData, max_length: int) -> list[EncodedExample]:
    """The client's tokenized training examples, encoded once per process.

    Checked against the records themselves: another seed gives a client of the same id other
    records (e.g. `flexmoe run --seeds` running seeds one after another in a process)."""
    tokenizer = mm.loaded.tokenizer
    key = (tokenizer.name_or_path, len(tokenizer), max_length, data.client_id)
    records = tuple(data.train)
    if key not in _encoded or _encoded[key][0] != records:
        _encoded[key] = (records, encode_dataset(data.train, tokenizer, max_length))
    return _encoded[key][1]


# ---------------------------------------------------------------- train / evaluate one client


@dataclass
class RoundJob:
    """What the server asks of a client in one round (decoded from the message config)."""

    server_round: int
    restore_round: int
    """Restore personal state saved in a round <= this one (the server's last checkpoint)."""
    lr: float
    local_steps: int
    batch_size: int
    prox_mu: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0


def client_store(
    state_dir: str, run_name: str, method: Method, partition_id: int
) -> ClientStateStore:
    return ClientStateStore(Path(state_dir) / run_name / method.name / f"client-{partition_id}")


def calibration_batches(mm: MethodModel, examples: list[EncodedExample], seed: int) -> list:
    """The batches of its own data a FLEx client selects its experts on (batches of 8)."""
    steps = max(1, -(-mm.flex.calibration_samples // 8))
    return draw_batches(examples, steps, 8, seed, mm.loaded.tokenizer.pad_token_id)


def restore_personal(
    mm: MethodModel,
    store: ClientStateStore,
    restore_round: int,
    data: ClientData,
    max_length: int,
    selection_seed: int,
) -> dict:
    """Put this client's personal tensors into the shared model; returns the FLEx selection.

    FLEx: the grafts of another client are removed, then this client's are loaded. A client
    with no saved state (its first round, or evaluated without ever being sampled) selects its
    experts on calibration batches of its own data drawn with `selection_seed`, and grafts them
    (the "random" ablation draws with a seed of its own per client, so clients differ).
    `local`: the client's own full model (the base model in its first round).
    """
    previous = store.latest(restore_round)
    model = mm.model
    if mm.method.graft:
        remove_graft(model)
        if previous is not None:
            handle = load_personal_state(model, previous / "personal")
        else:
            calibration = calibration_batches(
                mm, encoded_train(mm, data, max_length), selection_seed
            )
            flex = replace(mm.flex, seed=round_seed(mm.flex.seed, 0, data.client_id))
            handle = graft(model, select_experts(model, calibration, flex), flex)
        return {i: s.selected for i, s in handle.selections.items()}
    if mm.base_trainable is not None:
        _restore(
            model, load_file(previous / "local.safetensors") if previous else mm.base_trainable
        )
    return {}


def train_client(
    mm: MethodModel,
    data: ClientData,
    job: RoundJob,
    store: ClientStateStore,
    shared_in: dict[str, torch.Tensor],
    seed: int,
    max_length: int,
    server_control: dict[str, torch.Tensor] | None = None,
    drift_probe: drift.DriftProbe | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float | list[float]], dict[str, torch.Tensor]]:
    """One client's round: restore, train `local_steps` steps, save personal state and, with a
    `drift_probe`, measure the routing drift of the trained model from the base model.

    Returns the shared tensors to send, metrics, and (SCAFFOLD) the client's new control variate.
    """
    started = time.perf_counter()
    model, tokenizer = mm.model, mm.loaded.tokenizer
    examples = encoded_train(mm, data, max_length)
    if shared_in:
        load_shared(mm, shared_in)
    client_seed = round_seed(seed, job.server_round, data.client_id)
    restore_personal(mm, store, job.restore_round, data, max_length, client_seed)
    if drift_probe is not None:
        probe = drift_probe.batches(data, tokenizer)
        base_routing = drift.base_profile(
            store,
            drift_probe.identity(data, mm.loaded.source),
            model,
            probe,
            model_is_base=job.restore_round == 0,  # nothing differs from base yet: see `drift`
            model_source=mm.loaded.source,
        )
    if mm.method.trains == "all":
        trainable = {n for n, _ in model.named_parameters()}
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        trainable = set(freeze_for(model, mm.policy))
    params = {n: p for n, p in model.named_parameters() if n in trainable}
    batches = draw_batches(
        examples, job.local_steps, job.batch_size, client_seed, tokenizer.pad_token_id
    )
    hook = None
    control = None
    if server_control is not None:
        previous = store.latest(job.restore_round)
        c_i = scaffold.load_client_control(
            previous / "scaffold.safetensors" if previous else store.root / "none", server_control
        )
        correction = scaffold.control_correction(server_control, c_i)
        hook = lambda ps: scaffold.correct_gradients({n: ps[n] for n in correction}, correction)  # noqa: E731
    torch.manual_seed(client_seed)
    loss = train_local(
        model,
        params,
        batches,
        lr=job.lr,
        weight_decay=job.weight_decay,
        grad_clip=job.grad_clip,
        prox_mu=job.prox_mu,
        gradient_hook=hook,
    )
    routing_drift = (
        drift.drift_metrics(model, probe, base_routing) if drift_probe is not None else {}
    )
    shared_out = shared_tensors(mm)
    if server_control is not None:
        control = scaffold.updated_client_control(
            c_i, server_control, shared_in, shared_out, job.local_steps, job.lr
        )
    with store.writing(job.server_round) as out:
        if mm.method.graft:
            save_personal_state(
                model, out / "personal", {"client": data.name, "round": job.server_round}
            )
        elif mm.base_trainable is not None:
            save_file(
                {n: p.detach().contiguous() for n, p in params.items()}, out / "local.safetensors"
            )
        if control is not None:
            scaffold.save_client_control(out / "scaffold.safetensors", control)
    metrics = {
        "train-loss": loss,
        "num-examples": len(examples),
        **routing_drift,
        "seconds": time.perf_counter() - started,
    }
    return shared_out, metrics, ({"c_i": c_i, "new": control} if control is not None else {})


def evaluate_client(
    mm: MethodModel,
    data: ClientData,
    store: ClientStateStore,
    restore_round: int,
    shared_in: dict[str, torch.Tensor],
    samples: int,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    seed: int,
) -> dict[str, float]:
    """ROUGE of this client's model (global shared + its personal state) on its own test split.

    Predictions are written next to the client's state (they never leave the client).
    """
    if shared_in:
        load_shared(mm, shared_in)
    selection_seed = round_seed(seed, restore_round + 1, data.client_id)
    restore_personal(mm, store, restore_round, data, max_length, selection_seed)
    records = data.test[:samples]
    predictions = generate_responses(
        mm.model,
        mm.loaded.tokenizer,
        records,
        max_new_tokens=max_new_tokens,
        max_prompt_length=max_length - max_new_tokens,
        batch_size=batch_size,
    )
    scores = rouge_f1(predictions, [r.response for r in records])
    store.root.mkdir(parents=True, exist_ok=True)  # a client never sampled has no state yet
    with open(store.root / "predictions.jsonl", "w", encoding="utf-8") as f:
        for record, prediction in zip(records, predictions, strict=True):
            f.write(
                json.dumps(
                    {"id": record.id, "prediction": prediction, "reference": record.response}
                )
                + "\n"
            )
    return {**scores, "num-examples": len(records)}

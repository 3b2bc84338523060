"""Export one client's model from a run as a standalone directory, and load it back.

The directory written by `export_client_model`:
- a plain Hugging Face checkpoint (`config.json`, `model.safetensors`, tokenizer files): the base
  model with the method's final aggregated shared tensors and, for `local`, the client's own
  trained weights. It loads with `AutoModelForCausalLM.from_pretrained(dir)` alone. Under the
  `lora` sharing policy the shared attention LoRA adapters are merged into the attention weights
  (equal to the unmerged model up to float rounding); otherwise the weights are bit-identical.
- `personal/` (FLEx methods only): the client's personal state (grafted experts and gates) as
  written by `flexmoe.flex.save_personal_state`. A graft (k+1-th expert with a sigmoid gate beside
  the MoE block) has no counterpart in a transformers architecture, so it is re-attached by
  flexmoe: `flexmoe.flex.load_personal_state(model, dir / "personal")`.
- `flexmoe_export.json`: where the model comes from (run, method, client, round, base model) and
  its dtype.

`load_exported(dir)` does both steps and returns the model and tokenizer; its logits equal those of
`RunArtifacts(run).client_model(method, client)` exactly (the `lora` policy: up to rounding).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedTokenizerBase

from flexmoe import __version__
from flexmoe.federated import task
from flexmoe.federated.artifacts import RunArtifacts
from flexmoe.flex import load_personal_state, remove_graft
from flexmoe.models.loading import load_model

MANIFEST_FILE = "flexmoe_export.json"
PERSONAL_DIR = "personal"
EXPORT_SCHEMA = "flexmoe.export/1"


class ExportError(ValueError):
    """An export that cannot be written or read as asked; says what to do instead."""


def export_client_model(
    run_dir: str | Path,
    method: str,
    client: int | str,
    out_dir: str | Path,
    *,
    state_dir: str | Path | None = None,
) -> Path:
    """Write client `client`'s final model of `method` to `out_dir` (which must not exist or be
    empty); returns `out_dir`. Written under a temporary name first, so a failed export leaves
    nothing behind."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} already exists and is not empty: choose another directory")
    artifacts = RunArtifacts(run_dir, state_dir=state_dir)
    m, info = artifacts.method(method), artifacts.client(client)
    loaded = artifacts.client_model(method, info.id)
    model = loaded.model
    state = artifacts.client_state(method, info.id) if m.graft or not m.aggregates else None
    remove_graft(model)
    merged = merge_lora_layers(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    if m.graft:
        shutil.copytree(state / "personal", tmp / PERSONAL_DIR)
    manifest = {
        "schema": EXPORT_SCHEMA,
        "flexmoe_version": __version__,
        "run_dir": str(artifacts.run_dir.resolve()),
        "run_config_hash": artifacts.config.hash(),
        "method": method,
        "client": {"id": info.id, "name": info.name},
        "final_round": artifacts.final_round,
        "client_state_round": int(state.name.removeprefix("round-")) if state else None,
        "base_model": task.model_source(artifacts.config),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "personal_state": PERSONAL_DIR if m.graft else None,
        "merged_shared_lora_layers": merged,
        "load_with": "flexmoe.evaluation.export.load_exported(dir)",
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def merge_lora_layers(model: torch.nn.Module) -> int:
    """Fold every peft LoRA layer of `model` into its base Linear and put the Linear back in its
    place, so the model is a plain transformers model again; returns the number merged."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    return len(layers)


def load_exported(
    out_dir: str | Path, device: str = "auto"
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The exported model (with its grafts re-attached, for FLEx) in eval mode, and its tokenizer."""
    directory = Path(out_dir)
    manifest_file = directory / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ExportError(
            f"{directory} is not a flexmoe export (no {MANIFEST_FILE}); write one with "
            "`export_client_model` (or load a plain checkpoint with flexmoe.models.load_model)"
        )
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if manifest.get("schema") != EXPORT_SCHEMA:
        raise ExportError(
            f"{directory} has export schema {manifest.get('schema')!r}; this flexmoe reads "
            f"{EXPORT_SCHEMA}"
        )
    loaded = load_model(str(directory), dtype=manifest["dtype"], device=device)
    if manifest["personal_state"]:
        load_personal_state(loaded.model, directory / manifest["personal_state"])
    loaded.model.eval()
    return loaded.model, loaded.tokenizer

"""An exported client model is a plain HF checkpoint (+ FLEx personal state) that reproduces the
client's logits."""

import json

import pytest
import torch
from finished_runs import INPUT_IDS, METHODS
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flexmoe.evaluation.export import ExportError, export_client_model, load_exported
from flexmoe.federated.artifacts import RunArtifacts
from flexmoe.flex import find_grafts


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


@pytest.mark.parametrize("method", METHODS)
def test_export_reproduces_the_client_logits_exactly(run_dir, tmp_path, method):
    out = export_client_model(run_dir, method, "information_extraction", tmp_path / "export")
    model, tokenizer = load_exported(out)
    expected = RunArtifacts(run_dir).client_model(method, 1)
    assert torch.equal(logits(model), logits(expected.model))
    assert tokenizer("### Response:").input_ids == expected.tokenizer("### Response:").input_ids
    manifest = json.loads((out / "flexmoe_export.json").read_text())
    assert manifest["method"] == method
    assert manifest["client"] == {"id": 1, "name": "information_extraction"}
    assert manifest["client_state_round"] == (None if method == "fedavg" else 2)
    assert (manifest["personal_state"] is not None) == (method == "flex")


def test_flex_export_is_the_shared_model_plus_a_personal_state(run_dir, tmp_path):
    """Plain transformers loads the aggregated model; flexmoe re-attaches the client's graft."""
    out = export_client_model(run_dir, "flex", 0, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(out)
    artifacts = RunArtifacts(run_dir)
    assert torch.equal(logits(plain), logits(artifacts.global_model("flex").model))
    model, _ = load_exported(out)
    assert find_grafts(model)
    assert not torch.allclose(logits(model), logits(plain))


def test_lora_sharing_export_merges_the_adapters(lora_run_dir, tmp_path):
    out = export_client_model(lora_run_dir, "flex", 2, tmp_path / "export")
    saved = load_file(out / "model.safetensors")
    assert not [name for name in saved if "lora" in name or "base_layer" in name]
    manifest = json.loads((out / "flexmoe_export.json").read_text())
    assert manifest["merged_shared_lora_layers"] > 0
    model, _ = load_exported(out)
    expected = logits(RunArtifacts(lora_run_dir).client_model("flex", 2).model)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


def test_export_refuses_to_overwrite_and_to_load_non_exports(run_dir, tmp_path, tiny_lm_dir):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_client_model(run_dir, "fedavg", 0, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="not a flexmoe export"):
        load_exported(tiny_lm_dir)

"""RunArtifacts rebuilds, from a run directory alone, the very model each client evaluated."""

import json
import shutil

import pytest
import torch
from finished_runs import INPUT_IDS, METHODS

from flexmoe.evaluation.generation import generate_responses
from flexmoe.federated.artifacts import RunArtifactError, RunArtifacts, generate_text
from flexmoe.flex import find_grafts


def logits(loaded):
    with torch.no_grad():
        return loaded.model(input_ids=INPUT_IDS).logits


def saved_predictions(artifacts, method, client):
    """The (record, prediction) pairs the client wrote at its final evaluation."""
    path = artifacts.state_dir / artifacts.run_name / method / f"client-{client}"
    rows = [json.loads(line) for line in (path / "predictions.jsonl").read_text().splitlines()]
    test = {r.id: r for r in artifacts.client_data(client).test}
    return [(test[row["id"]], row["prediction"]) for row in rows]


def regenerate(artifacts, loaded, records):
    cfg = artifacts.config
    return generate_responses(
        loaded.model,
        loaded.tokenizer,
        records,
        max_new_tokens=cfg.eval.max_new_tokens,
        max_prompt_length=cfg.train.max_length - cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
    )


def test_reads_methods_clients_and_results(run_dir):
    artifacts = RunArtifacts(run_dir)
    assert artifacts.methods == list(METHODS)
    assert [(c.id, c.name) for c in artifacts.clients] == [
        (0, "closed_qa"),
        (1, "information_extraction"),
        (2, "classification"),
        (3, "summarization"),
    ]
    assert artifacts.client("classification") == artifacts.client(2) == artifacts.client("2")
    assert artifacts.final_round == 2
    assert artifacts.final_shared("local") == {}
    assert artifacts.client_state("flex", 0).name == "round-0002"


@pytest.mark.parametrize("method", METHODS)
def test_client_model_reproduces_the_run_predictions(run_dir, method):
    artifacts = RunArtifacts(run_dir)
    for client in artifacts.clients:
        pairs = saved_predictions(artifacts, method, client.id)
        loaded = artifacts.client_model(method, client.id)
        assert regenerate(artifacts, loaded, [r for r, _ in pairs]) == [p for _, p in pairs]


def test_the_personal_part_is_what_tells_clients_apart(run_dir):
    """Controls for the test above: the rebuilt models differ exactly where they should."""
    artifacts = RunArtifacts(run_dir)
    flex_0, flex_1 = (artifacts.client_model("flex", c) for c in (0, 1))
    assert find_grafts(flex_0.model) and not find_grafts(artifacts.global_model("flex").model)
    assert not torch.allclose(logits(flex_0), logits(flex_1))
    assert not torch.allclose(logits(flex_0), logits(artifacts.global_model("flex")))
    local_0, local_1 = (artifacts.client_model("local", c) for c in (0, 1))
    assert not torch.allclose(logits(local_0), logits(local_1))
    fedavg = logits(artifacts.global_model("fedavg"))
    assert torch.equal(logits(artifacts.client_model("fedavg", 3)), fedavg)


def test_lora_sharing_client_model_reproduces_the_run_predictions(lora_run_dir):
    artifacts = RunArtifacts(lora_run_dir)
    assert artifacts.config.sharing == "lora"
    assert all("lora_" in name for name in artifacts.final_shared("flex"))
    pairs = saved_predictions(artifacts, "flex", 1)
    loaded = artifacts.client_model("flex", 1)
    assert regenerate(artifacts, loaded, [r for r, _ in pairs]) == [p for _, p in pairs]


def test_generate_text_answers_like_the_evaluated_client(run_dir):
    artifacts = RunArtifacts(run_dir)
    record, prediction = saved_predictions(artifacts, "flex", 2)[0]
    answer = generate_text(
        run_dir,
        "flex",
        "classification",
        record.instruction,
        max_new_tokens=artifacts.config.eval.max_new_tokens,
        context=record.context,
    )
    assert answer == prediction


def test_clear_errors_for_what_a_run_does_not_hold(run_dir, tmp_path):
    with pytest.raises(RunArtifactError, match="not a flexmoe run directory"):
        RunArtifacts(tmp_path)
    artifacts = RunArtifacts(run_dir)
    with pytest.raises(RunArtifactError, match=r"not part of run .* it ran: flex, fedavg, local"):
        artifacts.client_model("fedprox", 0)
    with pytest.raises(RunArtifactError, match="not a flexmoe method"):
        artifacts.client_model("fedsomething", 0)
    with pytest.raises(RunArtifactError, match=r"no client 'poetry'.*0 \(closed_qa\)"):
        artifacts.client_model("flex", "poetry")
    with pytest.raises(RunArtifactError, match="has no global model"):
        artifacts.global_model("local")
    with pytest.raises(RunArtifactError, match="pass state_dir="):
        RunArtifacts(run_dir, state_dir=tmp_path / "elsewhere").client_model("flex", 0)


def test_an_unfinished_method_says_how_far_it_got(run_dir, tmp_path):
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("state"))
    (copy / "fedavg" / "result.json").unlink()
    artifacts = RunArtifacts(copy)
    assert artifacts.methods == ["flex", "local"]
    with pytest.raises(RunArtifactError, match=r"round 2 of 2 done.*--resume"):
        artifacts.global_model("fedavg")
    for method in METHODS:
        (copy / method / "result.json").unlink(missing_ok=True)
    with pytest.raises(RunArtifactError, match=r"no method of run .* has finished"):
        RunArtifacts(copy).client(0)

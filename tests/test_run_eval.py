"""`evaluate_run` adds retention, routing and cost to a real run's results.json, keeping what the
run wrote, with numbers that independent computations on the rebuilt models reproduce."""

import json
import math

import pytest
from evaluated_runs import METHODS, SETTINGS, evaluated_run, run_copy

from flexmoe.evaluation.perplexity import heldout_perplexity
from flexmoe.evaluation.run_eval import DRIFT_NOTE, EvalSettings, EvaluationError, evaluate_run
from flexmoe.federated.artifacts import RunArtifacts
from flexmoe.models.loading import load_model

CLIENTS = ("0", "1", "2", "3")


@pytest.fixture(scope="module")
def run_dir(tiny_lm_dir, tmp_path_factory):
    return evaluated_run(tiny_lm_dir, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_the_run_results_are_kept(run_dir, results):
    before = json.loads(
        (run_dir.parent.parent / "runs" / run_dir.name / "results.json").read_text()
    )
    for key in ("schema", "config_hash", "partition", "seed", "model"):
        assert results[key] == before[key]
    for method in METHODS:
        for key in ("clients", "average", "comm", "shared_parameters", "description"):
            assert results["methods"][method][key] == before["methods"][method][key]


def test_retention_has_every_client_a_mean_and_the_base_value(results):
    base = results["base"]
    assert base["mmlu"]["n"] == 8 and 0 <= base["mmlu"]["accuracy"] <= 100
    assert finite(base["perplexity"]["perplexity"]) and base["perplexity"]["tokens"] == 512
    for method in METHODS:
        retention = results["methods"][method]["retention"]
        for key, headline in (("mmlu", "accuracy"), ("perplexity", "perplexity")):
            block = retention[key]
            assert set(block["clients"]) == set(CLIENTS)
            values = [block["clients"][c][headline] for c in CLIENTS]
            assert all(finite(v) for v in values)
            assert block["mean"][headline] == pytest.approx(sum(values) / len(values))
            assert block["base"][headline] == base[key][headline]
    # FedAvg clients share one model; FLEx clients differ by their grafts.
    fedavg = results["methods"]["fedavg"]["retention"]["perplexity"]
    assert fedavg["same_model_for_all_clients"]
    assert len({fedavg["clients"][c]["perplexity"] for c in CLIENTS}) == 1
    flex = results["methods"]["flex"]["retention"]["perplexity"]
    assert not flex["same_model_for_all_clients"]
    assert len({flex["clients"][c]["perplexity"] for c in CLIENTS}) == len(CLIENTS)


def test_perplexities_match_independent_computations(run_dir, results):
    artifacts = RunArtifacts(run_dir)
    base = load_model(str(artifacts.config.model))
    expected = heldout_perplexity(base.model, base.tokenizer, max_tokens=512, progress=False)
    assert results["base"]["perplexity"]["perplexity"] == pytest.approx(expected["perplexity"])
    flex_2 = artifacts.client_model("flex", 2)
    expected = heldout_perplexity(flex_2.model, flex_2.tokenizer, max_tokens=512, progress=False)
    measured = results["methods"]["flex"]["retention"]["perplexity"]["clients"]["2"]
    assert measured["perplexity"] == pytest.approx(expected["perplexity"])


def test_routing_per_client_against_the_base_model(results):
    base = results["base"]["routing"]
    assert set(base["clients"]) == set(CLIENTS)
    assert "js_from_reference_bits" not in base["mean"]
    for method in METHODS:
        routing = results["methods"][method]["routing"]
        for client in CLIENTS:
            entry = routing["clients"][client]
            profile = entry["profile"]
            assert profile["layer_indices"] == base["clients"][client]["profile"]["layer_indices"]
            assert len(entry["layers"]) == len(profile["counts"])
            for layer, counts, k in zip(
                entry["layers"], profile["counts"], profile["top_k"], strict=True
            ):
                assert sum(counts) == layer["tokens"] * k
                assert 0 <= layer["js_from_reference_bits"] <= 1
                # The same prompts were routed by the base model.
                assert layer["tokens"] == sum(
                    row["tokens"]
                    for row in base["clients"][client]["layers"]
                    if row["layer"] == layer["layer"]
                )
        assert all(finite(v) for v in routing["mean"].values())
    flex = results["methods"]["flex"]["routing"]["mean"]
    assert 0 < flex["gate_mean"] < 1
    assert "gate_mean" not in results["methods"]["fedavg"]["routing"]["mean"]
    # Training every weight (routers included) moves the routing.
    assert results["methods"]["fedavg"]["routing"]["mean"]["js_from_reference_bits"] > 0


def test_cost_of_the_graft_and_the_evaluation_record(results):
    cost = results["cost"]
    assert list(cost) == ["flex"]
    assert cost["flex"]["flops_ratio"] > 1 and cost["flex"]["extra_active_params"] > 0
    assert finite(cost["flex"]["latency"]["ratio"]) and cost["flex"]["latency"]["new_tokens"] == 2
    record = results["evaluation"]
    assert set(record["settings"]) == {"rouge", "mmlu", "ppl", "routing", "cost"}
    assert record["settings"]["mmlu"]["mmlu_per_subject"] == 2
    assert DRIFT_NOTE in record["notes"]


def test_missing_rouge_is_recomputed_and_equals_the_run_score(tiny_lm_dir, tmp_path_factory):
    run_dir = run_copy(tiny_lm_dir, tmp_path_factory.getbasetemp(), "rouge")
    path = run_dir / "results.json"
    original = json.loads(path.read_text())
    damaged = json.loads(path.read_text())
    damaged["methods"]["flex"]["clients"]["1"] = {"name": "information_extraction", "error": "x"}
    damaged["methods"]["flex"]["average"] = {}
    path.write_text(json.dumps(damaged))
    repaired = evaluate_run(run_dir, ["rouge"], progress=False)
    assert (
        repaired["methods"]["flex"]["clients"]["1"] == original["methods"]["flex"]["clients"]["1"]
    )
    for key, value in original["methods"]["flex"]["average"].items():
        assert repaired["methods"]["flex"]["average"][key] == pytest.approx(value)
    assert "retention" not in repaired["methods"]["flex"] and "base" not in repaired


def test_clear_errors(run_dir, tmp_path):
    with pytest.raises(EvaluationError, match=r"unknown metric.*bleu"):
        evaluate_run(run_dir, ["bleu"])
    with pytest.raises(EvaluationError, match="not among the finished methods"):
        evaluate_run(run_dir, ["ppl"], methods=["fedprox"])
    other = EvalSettings(**{**vars(SETTINGS), "ppl_max_tokens": 256})
    with pytest.raises(EvaluationError, match="evaluated before with other settings"):
        evaluate_run(run_dir, ["ppl"], other, methods=["flex"])
    (tmp_path / "config.resolved.json").write_text((run_dir / "config.resolved.json").read_text())
    with pytest.raises(EvaluationError, match=r"has no results.json.*--resume"):
        evaluate_run(tmp_path, ["ppl"])


def test_continuing_a_finished_evaluated_run_keeps_and_does_not_redo_its_evaluation(
    run_dir, tmp_path, monkeypatch
):
    import dataclasses
    import shutil

    from flexmoe.evaluation import run_eval
    from flexmoe.federated.run import prepare_run_dir, run_methods

    copy = tmp_path / run_dir.name  # the same name: client state is filed under it
    shutil.copytree(run_dir, copy)
    before = (copy / "results.json").read_text()
    cfg = prepare_run_dir(copy, None, resume=True)
    assert run_methods(cfg, copy) == json.loads(before)
    assert (copy / "results.json").read_text() == before
    calls = []
    monkeypatch.setattr(run_eval, "evaluate_run", lambda *args, **kwargs: calls.append(args))
    asked = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, metrics=("rouge", "ppl")))
    run_eval.evaluate_configured(asked, copy)
    assert calls == []  # perplexity is in the results already

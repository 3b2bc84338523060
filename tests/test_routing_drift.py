"""Routing drift over rounds: every client reports, each round, the JS divergence of its routing
from the base model's on its probe; the base profile it keeps is the plain base model's, even for
a grafted model or a client first sampled after the shared weights moved; an unchanged model has
no drift at all."""

import json

import pytest
import torch
from federated_support import tiny_config, write_small_dolly

from flexmoe.evaluation.routing import RoutingProfile, routing_profile
from flexmoe.federated import task
from flexmoe.federated.artifacts import RunArtifacts
from flexmoe.federated.drift import BASE_PROFILE_FILE, DriftProbe
from flexmoe.federated.methods import METHODS
from flexmoe.models.loading import load_model
from flexmoe.moe import find_moe_layers

RUN_METHODS = ("flex", "fedavg", "local")  # the shared finished run (finished_runs.py)


@pytest.fixture(scope="module")
def base(tiny_lm_dir):
    """The plain base model: no graft, nothing trained."""
    return load_model(str(tiny_lm_dir))


def base_profile_of(base, cfg, data) -> RoutingProfile:
    """The plain base model's routing on a client's drift probe."""
    batches = DriftProbe.from_config(cfg).batches(data, base.tokenizer)
    return routing_profile(base.model, batches, progress=False)


def stored_base_profile(client_root) -> RoutingProfile:
    saved = json.loads((client_root / BASE_PROFILE_FILE).read_text())
    return RoutingProfile.from_dict(saved["profile"])


def test_every_client_reports_its_drift_every_round(run_dir, base):
    moe_layers = len(find_moe_layers(base.model))
    drifts = []
    for method in RUN_METHODS:
        lines = (run_dir / method / "rounds.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["round"] for r in records] == [1, 2]
        for record in records:
            assert sorted(record["clients"]) == ["0", "1", "2", "3"] and not record["excluded"]
            for metrics in record["clients"].values():
                layers = metrics["routing_js_layers"]
                assert len(layers) == moe_layers
                assert all(0 <= js <= 1 for js in layers)
                assert metrics["routing_js"] == pytest.approx(sum(layers) / moe_layers)
                drifts.append(metrics["routing_js"])
    assert max(drifts) > 0  # training (and FLEx's live graft) moved some routing


def test_the_stored_base_profile_is_the_plain_base_models(run_dir, base):
    # FLEx's was taken on the grafted model with the graft switched off; the baselines' on the
    # model holding the server's first shared weights (fedavg) or the client's start (local)
    artifacts = RunArtifacts(run_dir)
    for client in artifacts.clients:
        expected = base_profile_of(base, artifacts.config, artifacts.client_data(client.id))
        for method in RUN_METHODS:
            stored = stored_base_profile(artifacts.client_state(method, client.id).parent)
            assert torch.equal(stored.counts, expected.counts), (method, client)
            assert torch.equal(stored.tokens, expected.tokens)
            assert stored.gate_means == {}
            assert torch.allclose(stored.token_entropy, expected.token_entropy, atol=1e-12)


def test_no_drift_without_change_and_a_late_client_profiles_the_base(tiny_lm_dir, tmp_path, base):
    cfg = tiny_config(tiny_lm_dir, write_small_dolly(tmp_path / "dolly.jsonl"), ["fedavg"])
    fedavg = METHODS["fedavg"]
    mm = task.method_model(cfg, fedavg, "drift", fresh=True)
    probe = DriftProbe.from_config(cfg)

    def train(client: int, server_round: int, lr: float, shared: dict):
        job = task.RoundJob(server_round, server_round - 1, lr, local_steps=1, batch_size=2)
        store = task.client_store(str(tmp_path / "state"), "drift", fedavg, client)
        data = task.client_data(cfg, client, None)
        out = task.train_client(
            mm, data, job, store, shared, cfg.seed, cfg.train.max_length, drift_probe=probe
        )
        return out[0], out[1], store

    # lr 0: the model after local training is still the base model it profiled before training
    _, unchanged, _ = train(0, 1, 0.0, task.shared_tensors(mm))
    assert unchanged["routing_js"] == 0.0
    assert unchanged["routing_js_layers"] == [0.0] * len(unchanged["routing_js_layers"])
    # client 1 is first sampled in round 2 and receives trained weights: its base profile must
    # come from the base checkpoint, not from the model it is handed
    moved, _, _ = train(2, 1, 1e-2, task.shared_tensors(mm))
    _, late, store = train(1, 2, 1e-2, moved)
    expected = base_profile_of(base, cfg, task.client_data(cfg, 1, None))
    assert torch.equal(stored_base_profile(store.root).counts, expected.counts)
    assert late["routing_js"] > 0

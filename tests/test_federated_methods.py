"""Every method, two rounds on the tiny LM through the real ServerApp/ClientApp: what it trains,
what travels, what each client keeps — checked on the messages, the saved state and results."""

import json
import math

import numpy as np
import pytest
from federated_support import (
    ALL_METHODS,
    Spy,
    digests,
    tiny_config,
    weighted_mean,
    write_small_dolly,
)
from safetensors.numpy import load_file

from flexmoe.federated.methods import METHODS
from flexmoe.federated.run import RESULTS_SCHEMA, prepare_run_dir, run_methods
from flexmoe.federated.scaffold import CONTROL_DELTA_PREFIX
from flexmoe.models.loading import load_model
from flexmoe.moe.roles import Role, assign_roles

FLEX_LIKE = ("flex", "flex-nogate", "flex-random-expert", "flex-r2")
SHARED_ONLY = (*FLEX_LIKE, "fedit")
EVERYTHING_AGGREGATED = (
    "fedavg",
    "fedprox",
    "scaffold",
    "fedavgm",
    "fedadagrad",
    "fedyogi",
    "fedadam",
)
PRIVATE_ROLES = {str(Role.ROUTED_EXPERT), str(Role.ROUTER), str(Role.PERSONAL)}
ROUNDS = 2
CLIENTS = 4


@pytest.fixture(scope="module")
def run(tiny_lm_dir, tmp_path_factory):
    """One run of all 13 methods (the model is loaded once per method), observed by a spy."""
    root = tmp_path_factory.mktemp("all_methods")
    cfg = tiny_config(tiny_lm_dir, write_small_dolly(root / "dolly.jsonl"), ALL_METHODS)
    out = root / "run"
    prepare_run_dir(out, cfg, resume=False)
    spy = Spy(keep_arrays=("fedavg", "scaffold"))
    summary = run_methods(cfg, out, client=spy.app)
    base = load_model(str(tiny_lm_dir)).model
    base_params = {n: p.detach().numpy() for n, p in base.named_parameters()}
    return {
        "out": out,
        "spy": spy,
        "summary": summary,
        "base": digests(base_params),
        "roles": {n: str(r) for n, r in assign_roles(base).items()},
    }


def final_shared(run, method: str) -> dict[str, np.ndarray]:
    return dict(np.load(run["out"] / method / "final_shared.npz"))


def client_state(run, method: str, client: int, server_round: int = ROUNDS):
    return run["out"] / "state" / "run" / method / f"client-{client}" / f"round-{server_round:04d}"


def assert_one_set(exchanges) -> dict[str, str]:
    """Every client received the same arrays; returns them (digests)."""
    assert len(exchanges) == CLIENTS
    received = [e.received for e in exchanges]
    assert received[0] is not None
    assert all(r == received[0] for r in received)
    return received[0]


@pytest.mark.slow
def test_every_method_runs_with_finite_rouge_and_comm(run):
    methods = run["summary"]["methods"]
    assert set(ALL_METHODS) == set(METHODS)  # a new method must join this run
    assert list(methods) == list(ALL_METHODS)
    for name, result in methods.items():
        assert len(result["clients"]) == CLIENTS
        for client in result["clients"].values():
            assert "error" not in client, (name, client)
            for metric in ("rouge1", "rouge2", "rougeL"):
                assert 0.0 <= client[metric] <= 1.0 and math.isfinite(client[metric])
            assert client["num-examples"] == 2
        assert set(result["average"]) == {"rouge1", "rouge2", "rougeL"}
        comm = result["comm"]
        assert comm["total_bytes"] == comm["sent_bytes"] + comm["received_bytes"] > 0
        assert comm["per_round"][-1]["cumulative_bytes"] == comm["total_bytes"]
        # round 0: the partition query; 1..ROUNDS: training; ROUNDS + 1: the final evaluation
        assert [r["round"] for r in comm["per_round"]] == list(range(ROUNDS + 2))
        # SCAFFOLD ships the control variates too: twice a full model per training message
        assert 0 < comm["ratio_to_full_model"] <= (2.0001 if name == "scaffold" else 1.0001)
        log = [json.loads(line) for line in (run["out"] / name / "rounds.jsonl").open()]
        assert [entry["round"] for entry in log] == [1, 2]
        for entry in log:
            assert entry["excluded"] == {}
            assert sorted(entry["clients"]) == ["0", "1", "2", "3"]
            assert all(math.isfinite(c["train-loss"]) for c in entry["clients"].values())
    # FLEx ships only attention: a small fraction of what FedAvg ships.
    assert methods["flex"]["comm"]["ratio_to_fedavg"] < 0.25
    assert methods["fedavg"]["comm"]["ratio_to_fedavg"] == 1.0


@pytest.mark.slow
def test_results_file_and_run_directory_layout(run):
    out = run["out"]
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(run["summary"], default=float))
    assert set(saved) == {
        "schema",
        "flexmoe_version",
        "config_hash",
        "partition",
        "seed",
        "model",
        "methods",
    }
    assert saved["schema"] == RESULTS_SCHEMA
    assert set(saved["partition"]) == {"strategy", "hash", "clients"}
    assert {c["name"] for c in saved["partition"]["clients"].values()} == {
        "closed_qa",
        "information_extraction",
        "classification",
        "summarization",
    }
    for result in saved["methods"].values():
        assert set(result) == {
            "description",
            "clients",
            "average",
            "comm",
            "train_seconds",
            "shared_parameters",
        }
        assert set(result["comm"]) == {
            "total_bytes",
            "sent_bytes",
            "received_bytes",
            "full_model_equivalent_bytes",
            "ratio_to_full_model",
            "ratio_to_fedavg",
            "per_round",
        }
    assert (out / "config.resolved.json").is_file()
    for method in ALL_METHODS:
        for name in ("result.json", "rounds.jsonl", "checkpoint/meta.json"):
            assert (out / method / name).is_file(), (method, name)
        assert (out / method / "final_shared.npz").is_file() == (method != "local")
        assert not (out / method / "checkpoint.tmp").exists()
        for client in range(CLIENTS):
            root = client_state(run, method, client).parent
            assert sorted(p.name for p in root.iterdir()) == [
                "base-routing.json",
                "predictions.jsonl",
                "round-0001",
                "round-0002",
            ]


@pytest.mark.slow
@pytest.mark.parametrize("method", SHARED_ONLY)
def test_flex_changes_only_shared_and_personal_tensors(run, method):
    spy, base, roles = run["spy"], run["base"], run["roles"]
    attention = {n for n, r in roles.items() if r == Role.ATTENTION}
    assert attention and len(attention) < len(roles)
    final = final_shared(run, method)
    assert set(final) == attention
    # what travels: attention only, in both directions, every round
    for exchange in spy.select(method, "train"):
        assert set(exchange.received) == attention
        assert set(exchange.replied) == attention
    # after aggregation every client holds one set of shared tensors: the final global arrays
    assert assert_one_set(spy.select(method, "evaluate")) == digests(final)
    assert_one_set(spy.select(method, "train", server_round=2))
    evaluated = spy.select(method, "evaluate")
    for exchange in evaluated:
        model = exchange.model_after
        # routed experts, routers and every other frozen base tensor: bitwise the checkpoint's
        assert {n: model[n] for n in roles if n not in attention} == {
            n: base[n] for n in roles if n not in attention
        }
        assert {n: model[n] for n in attention} == digests(final)
        grafted = set(model) - set(roles)
        assert bool(grafted) == (method != "fedit")
    assert any(digests(final)[n] != base[n] for n in attention)
    if method == "fedit":
        return
    # personal tensors: kept per client on its disk, different for every pair of clients
    states = [
        load_file(client_state(run, method, c) / "personal" / "personal_state.safetensors")
        for c in range(CLIENTS)
    ]
    assert all(set(s) == set(states[0]) for s in states)
    for a in range(CLIENTS):
        for b in range(a + 1, CLIENTS):
            same = [k for k in states[a] if np.array_equal(states[a][k], states[b][k])]
            assert same == [], (a, b, same)
    first_round = load_file(
        client_state(run, method, 0, 1) / "personal" / "personal_state.safetensors"
    )
    assert any(not np.array_equal(first_round[k], states[0][k]) for k in first_round)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "strategy", "r", "gate"),
    [
        ("flex", "reconstruction", 1, "sigmoid"),
        ("flex-nogate", "reconstruction", 1, "none"),
        ("flex-random-expert", "random", 1, "sigmoid"),
        ("flex-r2", "reconstruction", 2, "sigmoid"),
    ],
)
def test_flex_variants_graft_what_they_say(run, method, strategy, r, gate):
    selections = []
    for client in range(CLIENTS):
        path = client_state(run, method, client) / "personal" / "personal_state.json"
        saved = json.loads(path.read_text())
        assert (saved["flex"]["strategy"], saved["flex"]["r"], saved["flex"]["gate"]) == (
            strategy,
            r,
            gate,
        )
        layers = saved["selections"].values()
        assert all(len(layer["selected"]) == r for layer in layers)
        selections.append([layer["selected"] for layer in layers])
    if strategy == "random":  # each client draws its own experts
        assert len({json.dumps(s) for s in selections}) > 1


@pytest.mark.slow
def test_flex_messages_carry_no_expert_router_or_personal_tensor(run):
    """The privacy property on the actual train replies, with roles taken on the grafted model."""
    for method in SHARED_ONLY:
        replies = run["spy"].select(method, "train")
        assert len(replies) == CLIENTS * ROUNDS
        for exchange in replies:
            assert set(exchange.reply_roles) == set(exchange.replied)
            assert set(exchange.reply_roles.values()) == {str(Role.ATTENTION)}
            assert not PRIVATE_ROLES & set(exchange.reply_roles.values())
    # and the grafted model did hold personal tensors that could have leaked
    grafted = run["spy"].select("flex", "evaluate")[0].model_after
    assert set(grafted) - set(run["roles"])


@pytest.mark.slow
@pytest.mark.parametrize("method", EVERYTHING_AGGREGATED)
def test_baselines_aggregate_every_parameter(run, method):
    spy, base, roles = run["spy"], run["base"], run["roles"]
    everything = set(roles)
    final = final_shared(run, method)
    assert set(final) == everything
    assert {v.dtype for v in final.values()} == {np.dtype(np.float32)}
    controls = {CONTROL_DELTA_PREFIX + k for k in everything} if method == "scaffold" else set()
    for exchange in spy.select(method, "train"):
        assert set(exchange.replied) == everything | controls
    assert assert_one_set(spy.select(method, "evaluate")) == digests(final)
    assert_one_set(spy.select(method, "train", server_round=2))
    for exchange in spy.select(method, "evaluate"):
        assert exchange.model_after == digests(final)
    changed = {roles[n] for n in everything if digests(final)[n] != base[n]}
    assert {str(Role.ROUTED_EXPERT), str(Role.ROUTER), str(Role.ATTENTION)} <= changed
    comm = run["summary"]["methods"][method]["comm"]
    assert comm["ratio_to_full_model"] > 0.99
    # FedProx's mu travels to the clients (which add the proximal term); nobody else's does
    mus = {e.config.get("proximal-mu") for e in spy.select(method, "train")}
    assert mus == ({0.01} if method == "fedprox" else {None})


@pytest.mark.slow
def test_local_sends_nothing_and_keeps_a_model_per_client(run):
    spy, base, roles = run["spy"], run["base"], run["roles"]
    exchanges = spy.select("local", "train") + spy.select("local", "evaluate")
    assert len(exchanges) == CLIENTS * (ROUNDS + 1)
    assert all(e.received is None and e.replied is None for e in exchanges)
    comm = run["summary"]["methods"]["local"]["comm"]
    # no message carried arrays, but MoE+FedAvg would have sent the full model in the same
    # exchanges: local's full-model equivalent is (up to config/metric bytes) FedAvg's traffic
    fedavg_total = run["summary"]["methods"]["fedavg"]["comm"]["total_bytes"]
    assert abs(comm["full_model_equivalent_bytes"] - fedavg_total) < 0.01 * fedavg_total
    assert comm["ratio_to_full_model"] < 0.01
    fedavg_round = run["summary"]["methods"]["fedavg"]["comm"]["per_round"][1]
    for entry in comm["per_round"]:
        assert entry["received_bytes"] < fedavg_round["received_bytes"] / 100
    models = [
        load_file(client_state(run, "local", c) / "local.safetensors") for c in range(CLIENTS)
    ]
    assert all(set(m) == set(roles) for m in models)
    for a in range(CLIENTS):
        for b in range(a + 1, CLIENTS):
            assert any(not np.array_equal(models[a][k], models[b][k]) for k in roles)
    for client, exchange in enumerate(spy.select("local", "evaluate")):
        assert exchange.model_after == digests(models[client])
        assert exchange.model_after != base


@pytest.mark.slow
def test_fedavg_is_the_sample_weighted_mean_of_the_replies(run):
    spy = run["spy"]
    for server_round in (1, 2):
        replies = spy.select("fedavg", "train", server_round)
        weights = [e.metrics["num-examples"] for e in replies]
        assert len(set(weights)) > 1  # unequal weights, so weighting errors show
        by_hand = {key: weighted_mean(replies, key) for key in replies[0].replied_arrays}
        unweighted = {k: np.mean([e.replied_arrays[k] for e in replies], axis=0) for k in by_hand}
        if server_round == 1:
            aggregated = spy.select("fedavg", "train", 2)[0].received_arrays
        else:
            aggregated = final_shared(run, "fedavg")
        assert set(aggregated) == set(by_hand)
        for key, expected in by_hand.items():
            np.testing.assert_allclose(aggregated[key], expected, rtol=1e-6, atol=1e-7)
        assert any(
            not np.allclose(aggregated[k], unweighted[k], rtol=1e-6, atol=1e-7) for k in by_hand
        )


@pytest.mark.slow
def test_scaffold_moves_to_the_plain_mean_of_the_replies(run):
    """SCAFFOLD's server step with lr_g = 1: x + mean(y_i - x) = the unweighted mean of y_i."""
    spy = run["spy"]
    replies = spy.select("scaffold", "train", 2)
    final = final_shared(run, "scaffold")
    for key, value in final.items():
        expected = np.mean([e.replied_arrays[key].astype(np.float64) for e in replies], axis=0)
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)

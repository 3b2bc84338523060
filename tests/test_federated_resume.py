"""Resume and determinism: a run stopped after round 1 and resumed ends bitwise where an
uninterrupted run ends (shared parameters, client state, server-optimiser state, metrics), and
the same seed twice gives the same results."""

import json
import pickle
import shutil

import numpy as np
import pytest
from federated_support import tiny_config, without_timings, write_small_dolly
from safetensors.numpy import load_file, save_file

from flexmoe.federated.run import prepare_run_dir, run_methods

RESUMED = ("flex", "scaffold", "fedadam", "local")
ROUNDS = 3
CLIENTS = 4


def round_log(out, method):
    return [without_timings(json.loads(line)) for line in (out / method / "rounds.jsonl").open()]


def state_files(out, method) -> dict[str, dict[str, np.ndarray]]:
    """Every client's newest saved tensors (personal state, local model, control variate)."""
    root = out / "state" / "run" / method
    return {
        str(path.relative_to(root)): load_file(path)
        for path in sorted(root.glob(f"client-*/round-{ROUNDS:04d}/**/*.safetensors"))
    }


def server_state(out, method):
    with open(out / method / "checkpoint" / "server_state.pkl", "rb") as f:
        return pickle.load(f)["strategy"]


def fake_interrupted_round(out, method) -> None:
    """What a run killed during round 2 leaves: a log line, and a client's half-finished
    round-2 state (here: its round-1 tensors doubled), which a resume must not use."""
    with open(out / method / "rounds.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"round": 2, "clients": {}, "excluded": {}, "seconds": 0}) + "\n")
    client = out / "state" / "run" / method / "client-0"
    shutil.copytree(client / "round-0001", client / "round-0002")
    for path in (client / "round-0002").glob("**/*.safetensors"):
        save_file({k: v * 2 for k, v in load_file(path).items()}, path)


@pytest.fixture(scope="module", params=RESUMED)
def runs(request, tiny_lm_dir, tmp_path_factory):
    """One method run uninterrupted, and run with a stop after round 1 then resumed, in the same
    process (so the resumed server meets a model the stopped run's clients have trained)."""
    method = request.param
    root = tmp_path_factory.mktemp(f"resume-{method}")
    cfg = tiny_config(
        tiny_lm_dir, write_small_dolly(root / "dolly.jsonl"), [method], train={"rounds": ROUNDS}
    )
    whole = root / "whole" / "run"  # the same run name: messages have the same sizes
    prepare_run_dir(whole, cfg, resume=False)
    run_methods(cfg, whole)
    resumed = root / "resumed" / "run"
    prepare_run_dir(resumed, cfg, resume=False)
    assert run_methods(cfg, resumed, stop_after=1) == {}
    stopped = {
        "meta": json.loads((resumed / method / "checkpoint" / "meta.json").read_text()),
        "log": round_log(resumed, method),
        "results": (resumed / "results.json").exists(),
        "result": (resumed / method / "result.json").exists(),
    }
    fake_interrupted_round(resumed, method)
    run_methods(prepare_run_dir(resumed, None, resume=True), resumed)
    return method, whole, resumed, stopped


def test_resumed_run_equals_uninterrupted_run(runs):
    method, whole, resumed, stopped = runs
    assert stopped["meta"]["round"] == 1
    assert [entry["round"] for entry in stopped["log"]] == [1]
    assert not stopped["results"] and not stopped["result"]

    # metrics: every round's train losses and examples, the final ROUGE and the comm ledger
    assert [entry["round"] for entry in round_log(whole, method)] == [1, 2, 3]
    assert round_log(resumed, method) == round_log(whole, method)
    results = [json.loads((out / "results.json").read_text()) for out in (whole, resumed)]
    assert without_timings(results[1]) == without_timings(results[0])

    # global shared parameters (none for `local`)
    if method != "local":
        finals = [np.load(out / method / "final_shared.npz") for out in (whole, resumed)]
        assert sorted(finals[0].files) == sorted(finals[1].files)
        for key in finals[0].files:
            assert np.array_equal(finals[0][key], finals[1][key]), key

    # client state: personal experts (flex), local models (local), control variates (scaffold)
    states = [state_files(out, method) for out in (whole, resumed)]
    assert sorted(states[0]) == sorted(states[1])
    assert len(states[0]) == (0 if method == "fedadam" else CLIENTS)
    for name, tensors in states[0].items():
        for key, value in tensors.items():
            assert np.array_equal(value, states[1][name][key]), (name, key)

    # server state: SCAFFOLD's control variate, FedAdam's moments
    servers = [server_state(out, method) for out in (whole, resumed)]
    if method == "scaffold":
        for key, value in servers[0].control.items():
            assert np.array_equal(value, servers[1].control[key]), key
        assert any(np.any(v != 0) for v in servers[0].control.values())
    if method == "fedadam":
        for moments in ("m_t", "v_t"):
            first, second = getattr(servers[0], moments), getattr(servers[1], moments)
            assert first.keys() == second.keys()
            assert all(np.array_equal(first[k], second[k]) for k in first)


def test_same_seed_same_results_and_another_seed_differs(tiny_lm_dir, tmp_path):
    data = write_small_dolly(tmp_path / "dolly.jsonl")
    outcomes = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        cfg = tiny_config(tiny_lm_dir, data, ["flex", "fedavg"], seed=seed)
        out = tmp_path / name / "run"
        prepare_run_dir(out, cfg, resume=False)
        run_methods(cfg, out)
        results = without_timings(json.loads((out / "results.json").read_text()))
        finals = {m: dict(np.load(out / m / "final_shared.npz")) for m in ("flex", "fedavg")}
        logs = {m: round_log(out, m) for m in ("flex", "fedavg")}
        outcomes.append((results, finals, logs))
    (results_a, finals_a, logs_a), (results_b, finals_b, logs_b), (_, finals_c, logs_c) = outcomes
    assert results_a == results_b
    assert logs_a == logs_b
    for method, arrays in finals_a.items():
        assert all(np.array_equal(v, finals_b[method][k]) for k, v in arrays.items())
    # the comparison can see a difference: another seed draws other batches and test items
    assert logs_c != logs_a
    assert any(not np.array_equal(v, finals_c["flex"][k]) for k, v in finals_a["flex"].items())

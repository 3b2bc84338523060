"""Faulty clients and the privacy guard: bad updates are logged and left out of aggregation, too
few good ones keep the global state; a FLEx client refuses to send a private tensor."""

import dataclasses
import json
import re

import numpy as np
import pytest
from federated_support import (
    Exchange,
    Spy,
    digests,
    tiny_config,
    weighted_mean,
    write_small_dolly,
)
from flwr.app import Array, ArrayRecord, Message

from flexmoe.federated import task
from flexmoe.federated.methods import METHODS
from flexmoe.federated.run import prepare_run_dir, run_methods
from flexmoe.flex import graft, remove_graft, select_experts
from flexmoe.moe.roles import Role, assign_roles

# (round, partition) -> fault: a client that raises, NaN/Inf or wrongly shaped arrays, a zero
# aggregation weight. Round 1 keeps two good replies (0 and 3), enough for
# min_successful_clients = 2; round 2 keeps one, so the global state must stay as it was.
FAULTS = {
    (1, 1): "raise",
    (1, 2): "nan",
    (2, 1): "shape",
    (2, 2): "inf",
    (2, 3): "weight",
}
REASONS = {
    "raise": "client error",
    "nan": "contains NaN or Inf",
    "inf": "contains NaN or Inf",
    "shape": "has shape",
    "weight": "not a positive number",
}


def inject(exchange: Exchange, reply: Message) -> Message:
    """Corrupt the reply of the (round, partition) pairs in FAULTS, after the real client ran."""
    fault = FAULTS.get((exchange.server_round, exchange.partition))
    if fault is None:
        return reply
    if fault == "raise":
        raise RuntimeError("injected client failure")
    if fault == "weight":
        reply.content["metrics"]["num-examples"] = 0
        return reply
    arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
    key = sorted(arrays)[0]
    if fault == "shape":
        arrays[key] = arrays[key][:-1]
    else:
        arrays[key].flat[3] = np.nan if fault == "nan" else np.inf
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return reply


def test_bad_updates_are_excluded_and_too_few_keep_the_global_state(tiny_lm_dir, tmp_path, capsys):
    cfg = tiny_config(
        tiny_lm_dir,
        write_small_dolly(tmp_path / "dolly.jsonl"),
        ["flex"],
        train={"min_successful_clients": 2},
    )
    out = tmp_path / "run"
    prepare_run_dir(out, cfg, resume=False)
    spy = Spy(keep_arrays=("flex",), corrupt=inject)
    summary = run_methods(cfg, out, client=spy.app)

    log = [json.loads(line) for line in (out / "flex" / "rounds.jsonl").open()]
    assert [sorted(entry["clients"]) for entry in log] == [["0", "3"], ["0"]]
    for entry in log:
        excluded = {(entry["round"], int(p)): why for p, why in entry["excluded"].items()}
        assert sorted(excluded) == sorted(k for k in FAULTS if k[0] == entry["round"])
        for key, why in excluded.items():
            assert REASONS[FAULTS[key]] in why, (key, why)
    assert "skipped_aggregation" not in log[0]
    assert log[1]["skipped_aggregation"] is True
    logged = re.sub(r"\s+", " ", capsys.readouterr().err)
    for server_round, partition in FAULTS:
        assert f"round {server_round}: client {partition} excluded" in logged
    assert "1 valid update(s) < minimum 2" in logged

    # round 1 aggregated the two good replies only: their sample-weighted mean
    good = [e for e in spy.select("flex", "train", 1) if e.partition in (0, 3)]
    after_round_1 = spy.select("flex", "train", 2)[0].received_arrays
    for key, value in after_round_1.items():
        np.testing.assert_allclose(value, weighted_mean(good, key), rtol=1e-6, atol=1e-7)
    # round 2 kept it: the final global arrays are what the clients received in round 2
    final = dict(np.load(out / "flex" / "final_shared.npz"))
    assert digests(final) == digests(after_round_1)
    assert spy.select("flex", "evaluate")[0].received == digests(after_round_1)

    # the run still finished: every client evaluated, the raised error counted in the ledger
    result = json.loads((out / "flex" / "result.json").read_text())
    assert result["comm"]["totals"]["failed_replies"] == 1
    assert all("rougeL" in c for c in summary["methods"]["flex"]["clients"].values())


@pytest.mark.parametrize("role", [Role.ROUTED_EXPERT, Role.ROUTER, Role.PERSONAL])
def test_privacy_guard_refuses_a_private_tensor_in_the_shared_set(tiny_lm_dir, tmp_path, role):
    cfg = tiny_config(tiny_lm_dir, tmp_path / "unused.jsonl", ["flex"])
    mm = task.method_model(cfg, METHODS["flex"], "privacy-guard", fresh=True)
    flex = dataclasses.replace(mm.flex, strategy="random")
    graft(mm.model, select_experts(mm.model, [], flex), flex)
    try:
        roles = assign_roles(mm.model)
        sent = task.shared_tensors(mm)
        assert sent and {roles[n] for n in sent} == {Role.ATTENTION}
        private = next(n for n, r in roles.items() if r is role)
        leaky = dataclasses.replace(mm, shared=[*mm.shared, private])
        with pytest.raises(task.PrivacyGuardError, match=re.escape(private)):
            task.shared_tensors(leaky)
        # the same set is fine for a baseline, which shares everything by design
        baseline = dataclasses.replace(leaky, method=METHODS["fedavg"])
        assert private in task.shared_tensors(baseline)
    finally:
        remove_graft(mm.model)

"""Partial participation (train.fraction_train < 1): seeded sampling, and clients never sampled
still evaluate (FLEx: with the experts they select on their own data)."""

import json

from federated_support import tiny_config, write_small_dolly

from flexmoe.federated.run import prepare_run_dir, run_methods

METHODS = ("flex", "scaffold", "local")


def test_clients_never_sampled_still_evaluate(tiny_lm_dir, tmp_path):
    cfg = tiny_config(
        tiny_lm_dir,
        write_small_dolly(tmp_path / "dolly.jsonl"),
        METHODS,
        train={"rounds": 1, "fraction_train": 0.5},
    )
    out = tmp_path / "run"
    prepare_run_dir(out, cfg, resume=False)
    summary = run_methods(cfg, out)
    sampled = {}
    for method in METHODS:
        (entry,) = [json.loads(line) for line in (out / method / "rounds.jsonl").open()]
        sampled[method] = sorted(entry["clients"])
        assert len(sampled[method]) == 2
        clients = summary["methods"][method]["clients"]
        assert all("rougeL" in c for c in clients.values()), clients
        for client in set(clients) - set(sampled[method]):
            root = out / "state" / "run" / method / f"client-{client}"
            assert [p.name for p in root.iterdir()] == ["predictions.jsonl"]
    # seeded over partition ids: every method samples the same clients
    assert sampled["flex"] == sampled["scaffold"] == sampled["local"]

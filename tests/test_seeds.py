"""Summaries over seeds: mean ± std per metric, FLEx vs baselines on (seed, client) pairs, and
`run_seeds` running one directory per seed, one after another or as parallel processes."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from federated_support import tiny_config, without_timings, write_small_dolly

from flexmoe.evaluation.seeds import (
    DEPENDENCE_NOTE,
    SeedsError,
    aggregate_runs,
    find_run_dirs,
    run_seeds,
)
from flexmoe.evaluation.stats import paired_comparison
from flexmoe.federated.parallel import ParallelRunError, logged_rounds, run_in_processes

CLIENTS = {"0": "closed_qa", "1": "summarization"}
# ROUGE-L per seed -> method -> client
ROUGE = {
    1: {"flex": [40.0, 30.0], "fedavg": [35.0, 31.0]},
    2: {"flex": [42.0, 28.0], "fedavg": [36.0, 27.5]},
    3: {"flex": [39.0, 33.0], "fedavg": [38.0, 30.0]},
}
MMLU = {1: {"flex": 50.0, "fedavg": 47.0}, 2: {"flex": 49.0, "fedavg": 46.0}}  # seed 3: none


def method_entry(rouge, mmlu=None, total_bytes=1000, rounds=2):
    clients = {
        cid: {"name": name, "rougeL": value, "rouge1": value + 1, "rouge2": value - 1}
        for (cid, name), value in zip(CLIENTS.items(), rouge, strict=True)
    }
    entry = {
        "description": "test method",
        "clients": clients,
        "average": {
            k: float(np.mean([c[k] for c in clients.values()]))
            for k in ("rouge1", "rouge2", "rougeL")
        },
        "comm": {
            "total_bytes": total_bytes,
            "ratio_to_fedavg": None,
            "ratio_to_full_model": 0.5,
            "per_round": [
                {"round": r, "sent_bytes": 10 * r, "received_bytes": 5, "cumulative_bytes": 0}
                for r in range(rounds + 2)
            ],
        },
        "train_seconds": 1.0,
        "shared_parameters": 10,
    }
    if mmlu is not None:
        entry["retention"] = {
            "mmlu": {
                "clients": {cid: {"accuracy": mmlu + i} for i, cid in enumerate(CLIENTS)},
                "mean": {"accuracy": mmlu + 0.5},
            }
        }
    return entry


def write_run(path, seed, methods, *, config_extra=None):
    path.mkdir(parents=True)
    config = {"seed": seed, "model": "m", "train": {"rounds": 2}, **(config_extra or {})}
    results = {
        "schema": "flexmoe.results/1",
        "config_hash": f"hash-{seed}",
        "partition": {
            "strategy": "pathological",
            "hash": f"partition-{seed}",
            "clients": {cid: {"name": n, "train": 5, "test": 2} for cid, n in CLIENTS.items()},
        },
        "seed": seed,
        "model": "m",
        "methods": methods,
    }
    (path / "config.resolved.json").write_text(json.dumps(config))
    (path / "results.json").write_text(json.dumps(results))
    return path


@pytest.fixture
def three_seeds(tmp_path):
    for seed, per_method in ROUGE.items():
        methods = {
            m: method_entry(rouge, MMLU.get(seed, {}).get(m)) for m, rouge in per_method.items()
        }
        write_run(tmp_path / f"seed-{seed}", seed, methods)
    return tmp_path


def test_mean_and_sample_std_over_seeds(three_seeds):
    summary = aggregate_runs(find_run_dirs(three_seeds))
    assert summary["seeds"] == [1, 2, 3] and summary["methods"] == ["flex", "fedavg"]
    averages = [np.mean(ROUGE[s]["flex"]) for s in (1, 2, 3)]
    stat = summary["metrics"]["flex"]["rougeL"]
    assert stat["mean"] == pytest.approx(np.mean(averages))
    assert stat["std"] == pytest.approx(np.std(averages, ddof=1))
    assert stat["values"] == pytest.approx(averages) and stat["seeds"] == [1, 2, 3]
    per_client = summary["client_metrics"]["fedavg"]["1"]["rougeL"]
    assert per_client["mean"] == pytest.approx(np.mean([31.0, 27.5, 30.0]))
    # A metric only some seeds have is summarised over those, and says so.
    mmlu = summary["metrics"]["flex"]["mmlu"]
    assert (mmlu["n"], mmlu["seeds"], mmlu["mean"]) == (2, [1, 2], pytest.approx(50.0))
    # Bytes per training round: rounds 1..2 of 0..3, sent + received.
    assert summary["metrics"]["flex"]["comm_round_bytes"]["mean"] == pytest.approx((15 + 25) / 2)


def test_flex_vs_baseline_is_the_paired_test_on_seed_client_pairs(three_seeds):
    summary = aggregate_runs(find_run_dirs(three_seeds))
    comparison = summary["comparisons"]["metrics"]["rougeL"]["fedavg"]
    pairs = [(s, c) for s in (1, 2, 3) for c in (0, 1)]
    expected = paired_comparison(
        {k: ROUGE[k[0]]["flex"][k[1]] for k in pairs},
        {k: ROUGE[k[0]]["fedavg"][k[1]] for k in pairs},
    )
    assert comparison["n"] == 6
    assert comparison["mean_difference"] == pytest.approx(expected.mean_difference)
    assert comparison["permutation_p"] == pytest.approx(expected.permutation_p)
    assert comparison["wilcoxon_p"] == pytest.approx(expected.wilcoxon_p)
    assert comparison["higher_is_better"] is True
    assert DEPENDENCE_NOTE in summary["comparisons"]["notes"]
    mmlu = summary["comparisons"]["metrics"]["mmlu"]["fedavg"]
    assert mmlu["n"] == 4 and mmlu["mean_difference"] == pytest.approx(3.0)
    assert "too few pairs" in mmlu["note"]


def test_scores_without_a_partner_are_left_out_and_counted(tmp_path):
    flex = method_entry([40.0, 30.0])
    fedavg = method_entry([35.0, 31.0])
    fedavg["clients"]["1"] = {"name": "summarization", "error": "evaluation failed"}
    summary = aggregate_runs([write_run(tmp_path / "run", 1, {"flex": flex, "fedavg": fedavg})])
    comparison = summary["comparisons"]["metrics"]["rougeL"]["fedavg"]
    assert comparison["n"] == 1 and comparison["pairs_without_partner"] == 1
    assert "too few pairs" in comparison["note"]
    assert any("without a partner" in note for note in summary["comparisons"]["notes"])
    assert summary["metrics"]["flex"]["rougeL"]["std"] is None
    assert "one seed: no spread over seeds (std n/a)" in summary["notes"]


def test_runs_of_different_configurations_or_repeated_seeds_are_refused(tmp_path):
    one = write_run(tmp_path / "a", 1, {"flex": method_entry([1.0, 2.0])})
    other = write_run(tmp_path / "b", 2, {"flex": method_entry([1.0, 2.0])}, config_extra={"lr": 1})
    again = write_run(tmp_path / "c", 1, {"flex": method_entry([1.0, 2.0])})
    with pytest.raises(SeedsError, match=r"differ in more than the seed.*lr"):
        aggregate_runs([one, other])
    with pytest.raises(SeedsError, match=r"seed\(s\) \[1\] appear in more than one run"):
        aggregate_runs([one, again])
    with pytest.raises(SeedsError, match="neither a run directory nor a directory of runs"):
        find_run_dirs(tmp_path / "a" / "nothing")


def test_without_flex_there_is_no_comparison(tmp_path):
    run = write_run(tmp_path / "r", 1, {"fedavg": method_entry([1.0, 2.0])})
    comparisons = aggregate_runs([run])["comparisons"]
    assert comparisons["metrics"] == {} and "no flex method" in comparisons["notes"][0]


def test_run_seeds_runs_one_directory_per_seed(tiny_lm_dir, tmp_path):
    data = write_small_dolly(tmp_path / "dolly.jsonl")
    cfg = tiny_config(tiny_lm_dir, data, ("flex", "fedavg"), train={"rounds": 1})
    out = tmp_path / "seeds"
    summary = run_seeds(cfg, [3, 1], out)
    assert [d.name for d in find_run_dirs(out)] == ["seed-1", "seed-3"]
    assert summary["seeds"] == [3, 1]
    assert json.loads((out / "summary.json").read_text()) == summary
    for seed in (1, 3):
        results = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert results["seed"] == seed
        index = summary["metrics"]["flex"]["rougeL"]["seeds"].index(seed)
        assert summary["metrics"]["flex"]["rougeL"]["values"][index] == pytest.approx(
            results["methods"]["flex"]["average"]["rougeL"]
        )
    assert summary["runs"][0]["partition_hash"] != summary["runs"][1]["partition_hash"]
    # Finished seeds are not run again; a directory of another configuration is refused.
    finished = (out / "seed-1" / "flex" / "result.json").stat().st_mtime_ns
    assert run_seeds(cfg, [1], out)["seeds"] == [1]
    assert (out / "seed-1" / "flex" / "result.json").stat().st_mtime_ns == finished
    changed = tiny_config(tiny_lm_dir, data, ("flex", "fedavg"), train={"rounds": 2})
    with pytest.raises(SeedsError, match="another configuration"):
        run_seeds(changed, [1], out)
    with pytest.raises(SeedsError, match="distinct seeds"):
        run_seeds(cfg, [1, 1], out)


def test_parallel_seeds_compute_what_sequential_seeds_compute(tiny_lm_dir, tmp_path, monkeypatch):
    data = write_small_dolly(tmp_path / "dolly.jsonl")
    cfg = tiny_config(
        tiny_lm_dir, data, ("flex", "fedavg"), train={"rounds": 1}, eval={"metrics": ["ppl"]}
    )
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two jobs of one thread each
    parallel = run_seeds(cfg, [1, 2], tmp_path / "parallel", jobs=2)
    # The same seeds one after another in one process, at the jobs' thread count from its start
    # (a process switched from 2 threads to 1 can sum floats in another order).
    config_file = tmp_path / "config.json"
    config_file.write_text(cfg.to_json())
    command = [sys.executable, "-m", "flexmoe", "--threads", "1", "run", "--seeds", "1,2"]
    command += ["--config", str(config_file), "--out", str(tmp_path / "sequential")]
    subprocess.run(command, check=True, capture_output=True)
    sequential = json.loads((tmp_path / "sequential" / "summary.json").read_text())

    for seed in (1, 2):
        run_dir = tmp_path / "parallel" / f"seed-{seed}"
        expected_dir = tmp_path / "sequential" / f"seed-{seed}"
        assert logged_rounds(run_dir) == 2 * 1  # methods x rounds: what the progress bar counts
        assert "flex" in (run_dir / "run.log").read_text()
        results, expected = (
            json.loads((d / "results.json").read_text()) for d in (run_dir, expected_dir)
        )
        assert "perplexity" in results["methods"]["flex"]["retention"]  # from `eval.metrics`
        assert without_timings(results["methods"]) == without_timings(expected["methods"])
        for method in results["methods"]:
            shared, expected_shared = (
                dict(np.load(d / method / "final_shared.npz")) for d in (run_dir, expected_dir)
            )
            assert shared.keys() == expected_shared.keys()
            for name, array in shared.items():
                np.testing.assert_array_equal(array, expected_shared[name])
    assert without_timings(parallel["metrics"]) == without_timings(sequential["metrics"])


def test_a_failed_parallel_run_is_reported_with_its_log(tmp_path):
    not_a_run = tmp_path / "seed-1"
    not_a_run.mkdir()
    with pytest.raises(ParallelRunError, match="seed-1 failed") as err:
        run_in_processes([not_a_run], jobs=2, threads=1, rounds_per_run=1)
    assert "config.resolved.json" in str(err.value)  # the run's own error, from its log


def test_stopping_interrupts_live_runs_and_kills_one_that_hangs(monkeypatch):
    import subprocess
    import sys

    from flexmoe.federated import parallel

    monkeypatch.setattr(parallel, "STOP_SECONDS", 1.0)
    code = "import signal, sys, time; {}; print('ready', flush=True); time.sleep(60)"
    ignores = "signal.signal(signal.SIGINT, signal.SIG_IGN)"
    processes = [
        subprocess.Popen([sys.executable, "-c", code.format(setup)], stdout=subprocess.PIPE)
        for setup in ("pass", ignores)
    ]
    for process in processes:
        assert process.stdout.readline() == b"ready\n"
    parallel._stop(processes)
    polite, hung = processes
    assert polite.returncode == -2  # exited on the interrupt (uncaught KeyboardInterrupt)
    assert hung.returncode == -9  # ignored the interrupt: killed

"""The embedded Flower runtime: bytes per round, runtime overhead, and memory with 8 vs 1 clients.

Each measurement runs `flexmoe.federated.run.run_methods` in a fresh subprocess (so peak memory
is that run's own) on the same model, side by side in one invocation:
- bytes per round, FLEx / MoE+FedAvg: both methods, 1 round, 4 clients (the ledger's totals);
- overhead: the share of a FLEx round's wall time not spent inside the clients' train functions
  (message serialisation, grid, strategy, checkpoint), from `rounds.jsonl` of an 8-client run;
- memory: peak RSS of an 8-client run over a 1-client run (one model shared by all simulated
  clients; target <= 1.3);
- with `--default-run`: the wall time of `flexmoe run` exactly as the README's first command runs
  it (built-in model already built), and its ROUGE-L table.

Run: `python benchmarks/runtime.py [--model DIR] [--default-run]` (default model: the built-in
one, built on first use) -> runtime.json and runtime.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
TARGET_OVERHEAD, TARGET_MEMORY = 0.10, 1.3

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from flexmoe import config as config_io
from flexmoe.federated.config import RunConfig
from flexmoe.federated.run import prepare_run_dir, run_methods
from flexmoe.runtime import configure_threads
configure_threads(2)
spec = json.loads(sys.argv[1])
out = Path(spec.pop("out"))
cfg = config_io.build(RunConfig, spec)
prepare_run_dir(out, cfg, resume=False)
start = time.perf_counter()
run_methods(cfg, out)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_default_run(out: Path) -> dict:
    """`flexmoe run --out OUT` with nothing else: the README's main job, timed from outside."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flexmoe", "run", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"flexmoe run failed:\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    clients = results["partition"]["clients"]
    rows = {
        name: {
            "rougeL": {clients[pid]["name"]: m["clients"][pid]["rougeL"] for pid in clients},
            "average_rougeL": m["average"]["rougeL"],
            "total_bytes": m["comm"]["total_bytes"],
        }
        for name, m in results["methods"].items()
    }
    return {"seconds": seconds, "methods": rows}


def spec_for(model: str, out: Path, methods: list[str], partition: dict, rounds: int) -> dict:
    return {
        "model": model,
        "out": str(out),
        "methods": methods,
        "data": {"test_per_client": 10, **partition},
        "train": {
            "rounds": rounds,
            "local_steps": 5,
            "batch_size": 8,
            "lr": 1e-3,
            "max_length": 256,
        },
        "eval": {"samples": 2, "max_new_tokens": 8},
        "flex": {"calibration_samples": 16, "calibration_max_length": 256},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--default-run", action="store_true", help="also time the default `flexmoe run`"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flexmoe-bench-"))
    pathological = {"partition": "pathological"}
    run(spec_for(args.model, tmp / "comm", ["flex", "fedavg"], pathological, 1))
    results = json.loads((tmp / "comm" / "results.json").read_text())
    flex_bytes = results["methods"]["flex"]["comm"]
    fedavg_bytes = results["methods"]["fedavg"]["comm"]
    iid = {"partition": "iid"}
    one = run(spec_for(args.model, tmp / "one", ["flex"], {**iid, "clients": 1}, 2))
    eight = run(spec_for(args.model, tmp / "eight", ["flex"], {**iid, "clients": 8}, 2))
    rounds = [json.loads(line) for line in (tmp / "eight" / "flex" / "rounds.jsonl").open()]
    round_seconds = sum(r["seconds"] for r in rounds)
    client_seconds = sum(c["seconds"] for r in rounds for c in r["clients"].values())
    overhead = (round_seconds - client_seconds) / round_seconds
    memory_ratio = eight["peak_rss_mb"] / one["peak_rss_mb"]
    record = {
        "model": args.model,
        "bytes_per_round": {
            "flex": flex_bytes["total_bytes"],
            "fedavg": fedavg_bytes["total_bytes"],
            "ratio": flex_bytes["total_bytes"] / fedavg_bytes["total_bytes"],
        },
        "overhead": {
            "round_seconds": round_seconds,
            "client_train_seconds": client_seconds,
            "share": overhead,
            "target": TARGET_OVERHEAD,
        },
        "memory": {
            "peak_rss_mb_1_client": one["peak_rss_mb"],
            "peak_rss_mb_8_clients": eight["peak_rss_mb"],
            "ratio": memory_ratio,
            "target": TARGET_MEMORY,
        },
    }
    if args.default_run:
        record["default_run"] = time_default_run(tmp / "default")
    (HERE / "runtime.json").write_text(json.dumps(record, indent=2) + "\n")
    b, o, m = record["bytes_per_round"], record["overhead"], record["memory"]
    table = [
        "# Embedded runtime: bytes, overhead, memory",
        "",
        f"Model `{args.model}`; `python benchmarks/runtime.py` (2 threads, fresh process per run).",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| bytes in one round, 4 clients: FLEx / MoE+FedAvg | {b['flex']:,} / {b['fedavg']:,} "
        f"= {b['ratio']:.4f} | |",
        f"| runtime overhead share of round time (8 clients, 2 rounds) | {o['share']:.3f} "
        f"({o['round_seconds'] - o['client_train_seconds']:.2f} s of {o['round_seconds']:.2f} s) "
        f"| <= {TARGET_OVERHEAD} |",
        f"| peak memory, 8 clients / 1 client | {m['peak_rss_mb_8_clients']:.0f} MB / "
        f"{m['peak_rss_mb_1_client']:.0f} MB = {m['ratio']:.2f} | <= {TARGET_MEMORY} |",
    ]
    if args.default_run:
        table += default_run_lines(record["default_run"])
    (HERE / "runtime.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def default_run_lines(default: dict) -> list[str]:
    methods = default["methods"]
    tasks = list(next(iter(methods.values()))["rougeL"])
    lines = [
        "",
        f"Default `flexmoe run` (built-in model already built): **{default['seconds'] / 60:.1f} "
        "minutes** wall time. ROUGE-L F1 (%):",
        "",
        "| method | " + " | ".join(tasks) + " | average | comm total (MB) |",
        "|---|" + "---:|" * (len(tasks) + 2),
    ]
    for name, row in methods.items():
        scores = " | ".join(f"{row['rougeL'][task]:.2f}" for task in tasks)
        lines.append(
            f"| {name} | {scores} | {row['average_rougeL']:.2f} | {row['total_bytes'] / 1e6:.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()

"""Several seeds of one run configuration: run them, and summarise their results over seeds.

The paper reports single runs; its reviewers asked for variance. `run_seeds` runs one
configuration under several seeds (one run directory per seed, OUT/seed-<s>), `aggregate_runs`
reads finished run directories of one configuration and writes what a reader needs:
- every metric per method as mean ± sample standard deviation over seeds (with the per-seed
  values), per client as well;
- FLEx against each other method on matched (seed, client) pairs: the paired permutation test
  and the Wilcoxon signed-rank test of `flexmoe.evaluation.stats`, with their plain warnings
  when there are few pairs.
The summary is JSON (OUT/summary.json) and is what `flexmoe report` turns into tables.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.evaluation.run_eval import evaluate_configured
from flexmoe.evaluation.stats import mean_std, paired_comparison
from flexmoe.federated.config import RunConfig
from flexmoe.federated.methods import resolve_methods
from flexmoe.federated.parallel import run_in_processes
from flexmoe.federated.run import prepare_run_dir, run_methods
from flexmoe.runtime import console

SUMMARY_FILE = "summary.json"
SUMMARY_SCHEMA = "flexmoe.summary/1"
CONFIG_FILE = "config.resolved.json"
RESULTS_FILE = "results.json"
REFERENCE_METHOD = "flex"
COMPARED_METRICS = ("rougeL", "mmlu", "perplexity")
"""Per-client metrics on which FLEx is compared with every other method."""
DEPENDENCE_NOTE = (
    "pairs of one seed come from one federated run (the clients trained together), so they are "
    "not fully independent; read the p-values as indicative"
)


class SeedsError(ValueError):
    """Runs that cannot be run or summarised together; the message says what differs."""


@dataclass(frozen=True)
class Metric:
    label: str
    higher_is_better: bool | None
    """None: neither direction is better (e.g. routing statistics)."""


METRICS: dict[str, Metric] = {
    "rougeL": Metric("ROUGE-L (%)", True),
    "rouge1": Metric("ROUGE-1 (%)", True),
    "rouge2": Metric("ROUGE-2 (%)", True),
    "mmlu": Metric("MMLU accuracy (%)", True),
    "perplexity": Metric("held-out perplexity", False),
    "routing_js": Metric("routing drift: JS from base (bits)", None),
    "routing_activation_std": Metric("expert activation std", None),
    "routing_token_entropy": Metric("router entropy per token (bits)", None),
    "routing_load_entropy": Metric("load entropy (bits)", None),
    "gate_mean": Metric("mean gate of the grafted expert", None),
    "comm_total_bytes": Metric("bytes in total", False),
    "comm_round_bytes": Metric("bytes per training round", False),
    "comm_ratio_to_fedavg": Metric("bytes / MoE+FedAvg bytes", False),
    "comm_ratio_to_full_model": Metric("bytes / full-model bytes", False),
    "shared_parameters": Metric("shared parameters", None),
    "train_seconds": Metric("training time (s)", False),
    "cost_flops_ratio": Metric("FLOPs per token, grafted / base", False),
    "cost_latency_ratio": Metric("generation latency, grafted / base", False),
    "cost_extra_active_params": Metric("extra active parameters per token", False),
}
_ROUTING_KEYS = {
    "routing_js": "js_from_reference_bits",
    "routing_activation_std": "activation_std",
    "routing_token_entropy": "token_entropy_bits",
    "routing_load_entropy": "load_entropy_bits",
    "gate_mean": "gate_mean",
}


# ---------------------------------------------------------------- running seeds


def seed_run_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def run_seeds(cfg: RunConfig, seeds: Sequence[int], out: str | Path, jobs: int = 1) -> dict:
    """Run `cfg` once per seed (OUT/seed-<s>, resumed if already started), then summarise.

    `jobs` > 1 runs that many seeds at once, as separate processes sharing this process's torch
    threads (see `flexmoe.federated.parallel`). A seed directory that already holds a run of
    another configuration is an error, not silently reused. Returns the summary, also written
    to OUT/summary.json.
    """
    out = Path(out)
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise SeedsError(f"give distinct seeds, e.g. --seeds 1,2,3 (got {seeds})")
    seeded = [dataclasses.replace(cfg, seed=seed) for seed in seeds]
    run_dirs = [_prepare_seed_dir(seed_cfg, out) for seed_cfg in seeded]
    jobs = min(jobs, len(seeds))
    if jobs > 1:
        run_in_processes(
            run_dirs,
            jobs=jobs,
            threads=max(1, torch.get_num_threads() // jobs),
            rounds_per_run=len(resolve_methods(cfg.methods)) * cfg.train.rounds,
        )
    else:
        for seed_cfg, run_dir in zip(seeded, run_dirs, strict=True):
            console.rule(f"seed {seed_cfg.seed}")
            run_methods(seed_cfg, run_dir)
            evaluate_configured(seed_cfg, run_dir)
    summary = aggregate_runs(run_dirs)
    write_summary(out, summary)
    return summary


def _prepare_seed_dir(cfg: RunConfig, out: Path) -> Path:
    """OUT/seed-<s> holding `cfg`: created, or checked to hold this very configuration."""
    run_dir = seed_run_dir(out, cfg.seed)
    if not (run_dir / CONFIG_FILE).is_file():
        prepare_run_dir(run_dir, cfg, resume=False)
        return run_dir
    existing = prepare_run_dir(run_dir, None, resume=True)
    if existing.hash() != cfg.hash():
        raise SeedsError(
            f"{run_dir} holds a run of another configuration (hash {existing.hash()}, "
            f"this one {cfg.hash()}): choose another --out"
        )
    console.log(f"seed {cfg.seed}: continuing {run_dir}")
    return run_dir


def find_run_dirs(path: str | Path) -> list[Path]:
    """`path` itself if it is a run directory, else its run subdirectories (e.g. seed-1, ...)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return [path]
    found = sorted(
        (d for d in path.iterdir() if (d / CONFIG_FILE).is_file()) if path.is_dir() else [],
        key=_seed_order,
    )
    if not found:
        raise SeedsError(
            f"{path} is neither a run directory nor a directory of runs (no {CONFIG_FILE} in it "
            "or its subdirectories): pass what `flexmoe run --out` wrote"
        )
    return found


def write_summary(out: str | Path, summary: dict) -> Path:
    path = Path(out) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- aggregating


def aggregate_runs(run_dirs: Sequence[str | Path], reference: str = REFERENCE_METHOD) -> dict:
    """Mean ± std over the runs (one per seed) of every metric, and `reference` vs the rest."""
    runs = [_read_run(Path(d)) for d in run_dirs]
    if not runs:
        raise SeedsError("no run directories to aggregate")
    _check_same_configuration(runs)
    notes: list[str] = []
    methods = list(dict.fromkeys(m for run in runs for m in run["results"]["methods"]))
    clients = {cid: c["name"] for cid, c in runs[0]["results"]["partition"]["clients"].items()}
    for run in runs[1:]:
        names = {cid: c["name"] for cid, c in run["results"]["partition"]["clients"].items()}
        if names != clients:
            notes.append(
                f"seed {run['seed']} names its clients differently ({names}); clients are "
                "matched by id across seeds"
            )
    settings = [run["results"].get("evaluation", {}).get("settings", {}) for run in runs]
    for run, evaluated in zip(runs[1:], settings[1:], strict=True):
        differing = sorted(
            m for m in evaluated.keys() & settings[0].keys() if evaluated[m] != settings[0][m]
        )
        if differing:
            notes.append(
                f"seed {run['seed']} was evaluated with other settings for {', '.join(differing)} "
                f"than seed {runs[0]['seed']}: re-run `flexmoe evaluate` on all seeds alike"
            )
    per_seed = {run["seed"]: extract_metrics(run["results"], run["rounds"]) for run in runs}
    for method in methods:
        missing = [s for s, m in per_seed.items() if method not in m["methods"]]
        if missing:
            notes.append(f"{method} is missing from seed(s) {missing}")
    if len(runs) == 1:
        notes.append("one seed: no spread over seeds (std n/a)")
    return {
        "schema": SUMMARY_SCHEMA,
        "runs": [
            {
                "dir": str(run["dir"].resolve()),
                "seed": run["seed"],
                "config_hash": run["results"]["config_hash"],
                "partition_hash": run["results"]["partition"]["hash"],
                "evaluated": sorted(run["results"].get("evaluation", {}).get("settings", {})),
            }
            for run in runs
        ],
        "seeds": [run["seed"] for run in runs],
        "model": runs[0]["results"]["model"],
        "partition_strategy": runs[0]["results"]["partition"]["strategy"],
        "config": {k: v for k, v in runs[0]["config"].items() if k != "seed"},
        "methods": methods,
        "descriptions": {
            m: next(
                r["results"]["methods"][m]["description"]
                for r in runs
                if m in r["results"]["methods"]
            )
            for m in methods
        },
        "clients": clients,
        "evaluation": settings[0],
        "metrics": {
            method: _over_seeds({s: m["methods"].get(method, {}) for s, m in per_seed.items()})
            for method in methods
        },
        "client_metrics": {
            method: {
                cid: _over_seeds(
                    {s: m["clients"].get(method, {}).get(cid, {}) for s, m in per_seed.items()}
                )
                for cid in clients
            }
            for method in methods
        },
        "base": _over_seeds({s: m["base"] for s, m in per_seed.items()}),
        "cost": next(
            (
                {"seed": run["seed"], "methods": run["results"]["cost"]}
                for run in runs
                if run["results"].get("cost")
            ),
            None,
        ),
        "comparisons": compare_methods(per_seed, methods, reference),
        "notes": notes,
    }


def extract_metrics(results: dict, rounds: int) -> dict:
    """One run's numbers: {"methods": {m: {metric: v}}, "clients": {m: {cid: {metric: v}}},
    "base": {metric: v}}; metrics a run lacks (e.g. not evaluated) are simply absent."""
    methods, clients = {}, {}
    for name, entry in results["methods"].items():
        values = {
            k: entry["average"][k] for k in ("rougeL", "rouge1", "rouge2") if k in entry["average"]
        }
        retention = entry.get("retention", {})
        if "mmlu" in retention:
            values["mmlu"] = retention["mmlu"]["mean"]["accuracy"]
        if "perplexity" in retention:
            values["perplexity"] = retention["perplexity"]["mean"]["perplexity"]
        values |= _routing_values(entry.get("routing", {}).get("mean", {}))
        comm = entry["comm"]
        training = [r for r in comm["per_round"] if 1 <= r["round"] <= rounds]
        values["comm_total_bytes"] = comm["total_bytes"]
        if training:
            values["comm_round_bytes"] = sum(
                r["sent_bytes"] + r["received_bytes"] for r in training
            ) / len(training)
        if comm.get("ratio_to_fedavg") is not None:
            values["comm_ratio_to_fedavg"] = comm["ratio_to_fedavg"]
        values["comm_ratio_to_full_model"] = comm["ratio_to_full_model"]
        values["shared_parameters"] = entry["shared_parameters"]
        values["train_seconds"] = entry["train_seconds"]
        cost = results.get("cost", {}).get(name)
        if cost:
            values["cost_flops_ratio"] = cost["flops_ratio"]
            values["cost_latency_ratio"] = cost["latency"]["ratio"]
            values["cost_extra_active_params"] = cost["extra_active_params"]
        methods[name] = values
        clients[name] = _client_values(entry)
    base = results.get("base", {})
    base_values = {}
    if "mmlu" in base:
        base_values["mmlu"] = base["mmlu"]["accuracy"]
    if "perplexity" in base:
        base_values["perplexity"] = base["perplexity"]["perplexity"]
    base_values |= _routing_values(base.get("routing", {}).get("mean", {}))
    return {"methods": methods, "clients": clients, "base": base_values}


def compare_methods(per_seed: dict[int, dict], methods: list[str], reference: str) -> dict:
    """`reference` against every other method on (seed, client) pairs, per compared metric."""
    if reference not in methods:
        return {
            "reference": reference,
            "metrics": {},
            "notes": [f"no comparison: the runs have no {reference} method"],
        }
    notes = [DEPENDENCE_NOTE]
    compared: dict[str, dict] = {}
    for metric in COMPARED_METRICS:
        scores = {
            method: {
                (seed, cid): values[metric]
                for seed, m in per_seed.items()
                for cid, values in m["clients"].get(method, {}).items()
                if metric in values
            }
            for method in methods
        }
        if not scores[reference]:
            continue
        compared[metric] = {}
        for baseline in methods:
            if baseline == reference or not scores[baseline]:
                continue
            common = scores[reference].keys() & scores[baseline].keys()
            dropped = len(scores[reference]) + len(scores[baseline]) - 2 * len(common)
            if not common:
                continue
            result = paired_comparison(
                {k: scores[reference][k] for k in sorted(common)},
                {k: scores[baseline][k] for k in sorted(common)},
            )
            compared[metric][baseline] = {
                **result.to_dict(),
                "higher_is_better": METRICS[metric].higher_is_better,
                "pairs_without_partner": dropped,
            }
            if dropped:
                notes.append(
                    f"{metric}, {reference} vs {baseline}: {dropped} (seed, client) score(s) "
                    "without a partner in the other method were left out"
                )
    return {"reference": reference, "pairs": "(seed, client)", "metrics": compared, "notes": notes}


def _client_values(entry: dict) -> dict[str, dict[str, float]]:
    retention = entry.get("retention", {})
    routing = entry.get("routing", {}).get("clients", {})
    out: dict[str, dict[str, float]] = {}
    for cid, scores in entry["clients"].items():
        values = {k: scores[k] for k in ("rougeL", "rouge1", "rouge2") if k in scores}
        if cid in retention.get("mmlu", {}).get("clients", {}):
            values["mmlu"] = retention["mmlu"]["clients"][cid]["accuracy"]
        if cid in retention.get("perplexity", {}).get("clients", {}):
            values["perplexity"] = retention["perplexity"]["clients"][cid]["perplexity"]
        if cid in routing:
            values |= _routing_values(routing[cid]["mean"])
        out[cid] = values
    return out


def _routing_values(mean: dict) -> dict[str, float]:
    return {name: mean[key] for name, key in _ROUTING_KEYS.items() if key in mean}


def _over_seeds(per_seed: dict[int, dict[str, float]]) -> dict[str, dict]:
    """metric -> {"mean", "std", "n", "values", "seeds"} over the seeds that have the metric."""
    names = list(dict.fromkeys(k for values in per_seed.values() for k in values))
    out = {}
    for name in names:
        seeds = [s for s, values in per_seed.items() if name in values]
        values = [per_seed[s][name] for s in seeds]
        stats = mean_std(values)
        out[name] = {
            "mean": stats.mean,
            "std": stats.std,
            "n": stats.n,
            "values": values,
            "seeds": seeds,
        }
    return out


def _read_run(run_dir: Path) -> dict:
    for name in (CONFIG_FILE, RESULTS_FILE):
        if not (run_dir / name).is_file():
            raise SeedsError(
                f"{run_dir} has no {name}: "
                + (
                    f"the run has not finished; continue it with `flexmoe run --resume {run_dir}`"
                    if name == RESULTS_FILE
                    else "it is not a flexmoe run directory"
                )
            )
    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    results = json.loads((run_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    return {
        "dir": run_dir,
        "seed": results["seed"],
        "config": config,
        "rounds": config["train"]["rounds"],
        "results": results,
    }


def _check_same_configuration(runs: list[dict]) -> None:
    seeds = [run["seed"] for run in runs]
    duplicated = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicated:
        dirs = [str(run["dir"]) for run in runs if run["seed"] in duplicated]
        raise SeedsError(f"seed(s) {duplicated} appear in more than one run ({', '.join(dirs)})")
    first = _flatten({k: v for k, v in runs[0]["config"].items() if k != "seed"})
    for run in runs[1:]:
        other = _flatten({k: v for k, v in run["config"].items() if k != "seed"})
        differing = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differing:
            raise SeedsError(
                f"{run['dir']} and {runs[0]['dir']} differ in more than the seed "
                f"({', '.join(differing[:5])}): summarise runs of one configuration"
            )


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _seed_order(path: Path) -> tuple[int, str]:
    """seed-2 before seed-10; other names after, alphabetically."""
    suffix = path.name.removeprefix("seed-")
    return (int(suffix), "") if suffix.isdigit() else (1 << 62, path.name)

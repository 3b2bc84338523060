"""The report's tables, built from a seeds summary (`flexmoe.evaluation.seeds.aggregate_runs`).

Every number is the mean over seeds, followed by "± std" (sample standard deviation) when there
are several seeds; a dash marks a value that was not measured (e.g. `flexmoe evaluate` not run).
"""

from __future__ import annotations

import math

from flexmoe.evaluation.seeds import METRICS
from flexmoe.reports.document import Table

MISSING = "–"


def format_stat(stat: dict | None, digits: int = 2) -> str:
    """ "mean ± std" (std only over several seeds), or a dash when the value is missing."""
    if stat is None or stat["mean"] is None or not math.isfinite(stat["mean"]):
        return MISSING
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_bytes(n: float) -> str:
    """Decimal units (kB = 1000 B), as network traffic is counted."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def table1(summary: dict) -> Table:
    """The paper's Table 1: per-task ROUGE-L, their average, MMLU and held-out perplexity."""
    clients = summary["clients"]
    header = ["method", *clients.values(), "average", "MMLU (%)", "perplexity"]
    rows, stats = [], []
    for method in summary["methods"]:
        per_client = summary["client_metrics"][method]
        metrics = summary["metrics"][method]
        row_stats = [per_client.get(cid, {}).get("rougeL") for cid in clients]
        row_stats += [metrics.get("rougeL"), metrics.get("mmlu"), metrics.get("perplexity")]
        stats.append(row_stats)
        rows.append([method, *(format_stat(s) for s in row_stats)])
    directions = [True] * (len(clients) + 2) + [False]
    bold = _best_cells(stats, directions, offset=1)
    base = summary.get("base", {})
    no_rouge = [MISSING] * (len(clients) + 1)
    rows.append(
        [
            "base model",
            *no_rouge,
            format_stat(base.get("mmlu")),
            format_stat(base.get("perplexity")),
        ]
    )
    return Table(header, rows, bold, caption=_table1_caption(summary))


def comm_table(summary: dict) -> Table:
    """Measured bytes per method: per training round, in total, relative to MoE+FedAvg."""
    header = [
        "method",
        "shared parameters",
        "bytes per round",
        "bytes in total",
        "vs MoE+FedAvg",
        "vs full model",
    ]
    rows = []
    for method in summary["methods"]:
        m = summary["metrics"][method]
        rows.append(
            [
                method,
                f"{m['shared_parameters']['mean']:,.0f}" if "shared_parameters" in m else MISSING,
                format_bytes(m["comm_round_bytes"]["mean"]) if "comm_round_bytes" in m else MISSING,
                format_bytes(m["comm_total_bytes"]["mean"]) if "comm_total_bytes" in m else MISSING,
                _ratio(m.get("comm_ratio_to_fedavg")),
                _ratio(m.get("comm_ratio_to_full_model")),
            ]
        )
    caption = (
        "Bytes measured on the wire (server to clients and back, all clients). Per round: mean "
        "over training rounds; the total also counts the initial exchange and the final "
        "evaluation round. 'vs full model': the bytes if every round shipped the whole model."
    )
    return Table(header, rows, caption=caption)


ROUTING_COLUMNS = (
    "routing_activation_std",
    "routing_token_entropy",
    "routing_load_entropy",
    "routing_js",
    "gate_mean",
)


def routing_table(summary: dict) -> Table:
    """Routing statistics per method and of the base model, averaged over layers and clients."""
    header = ["model", *(METRICS[c].label for c in ROUTING_COLUMNS)]
    rows = [
        ["base model", *(format_stat(summary.get("base", {}).get(c), 3) for c in ROUTING_COLUMNS)]
    ]
    for method in summary["methods"]:
        m = summary["metrics"][method]
        rows.append([method, *(format_stat(m.get(c), 3) for c in ROUTING_COLUMNS)])
    caption = (
        "Mean over MoE layers and clients, each client's model on its own test prompts. "
        "Activation std: spread of the experts' activation frequencies (0 = perfectly "
        "balanced). Entropies in bits. JS from base: Jensen-Shannon divergence of each layer's "
        "load from the base model's on the same prompts (routing drift), after the final round."
    )
    return Table(header, rows, caption=caption)


def comparison_table(summary: dict) -> Table:
    """FLEx minus each other method on (seed, client) pairs, with both tests' p-values."""
    comparisons = summary["comparisons"]
    reference = comparisons["reference"]
    header = [
        "metric",
        "against",
        "pairs",
        f"mean difference ± std ({reference} − it)",
        "permutation p",
        "Wilcoxon p",
        "note",
    ]
    rows = []
    for metric, baselines in comparisons["metrics"].items():
        better = {True: "higher is better", False: "lower is better", None: ""}
        for baseline, result in baselines.items():
            difference = result["mean_difference"]
            spread = (
                "" if result["std_difference"] is None else f" ± {result['std_difference']:.2f}"
            )
            rows.append(
                [
                    f"{METRICS[metric].label}, {better[result['higher_is_better']]}",
                    baseline,
                    str(result["n"]),
                    f"{difference:+.2f}{spread}",
                    f"{result['permutation_p']:.4g}",
                    f"{result['wilcoxon_p']:.4g}",
                    result["note"],
                ]
            )
    numeric = [False, False, True, True, True, True, False]
    caption = ""
    if rows:
        caption = next(iter(next(iter(comparisons["metrics"].values())).values()))["test"]
    return Table(header, rows, caption=caption, numeric=numeric)


def runs_table(summary: dict) -> Table:
    """One row per seed: where its run lives and the hashes that identify it."""
    header = ["seed", "run directory", "config hash", "partition hash", "evaluated"]
    rows = [
        [
            str(run["seed"]),
            run["dir"],
            run["config_hash"],
            run["partition_hash"][:16],
            ", ".join(run["evaluated"]) or "(not yet: `flexmoe evaluate`)",
        ]
        for run in summary["runs"]
    ]
    return Table(header, rows, numeric=[False] * len(header))


def _ratio(stat: dict | None) -> str:
    """A byte ratio: fixed by the model and the rounds, so the mean alone (4 significant digits)."""
    return MISSING if stat is None else f"{stat['mean']:.4g}"


def _best_cells(
    stats: list[list[dict | None]], higher_is_better: list[bool], offset: int
) -> set[tuple[int, int]]:
    """(row, column) of the best mean of every column (ties: all of them)."""
    bold = set()
    for column, higher in enumerate(higher_is_better):
        means = [
            row[column]["mean"]
            for row in stats
            if row[column] is not None and math.isfinite(row[column]["mean"])
        ]
        if not means:
            continue
        best = max(means) if higher else min(means)
        for r, row in enumerate(stats):
            if row[column] is not None and row[column]["mean"] == best:
                bold.add((r, column + offset))
    return bold


def _table1_caption(summary: dict) -> str:
    seeds = summary["seeds"]
    spread = (
        f"Mean ± sample std over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
        if len(seeds) > 1
        else f"One seed ({seeds[0]}), no spread"
    )
    settings = summary.get("evaluation", {})
    mmlu = settings.get("mmlu")
    ppl = settings.get("ppl")
    retention = []
    if mmlu:
        retention.append(
            f"MMLU accuracy (%) on a subject-balanced subset ({mmlu['mmlu_per_subject']} per "
            f"subject, {mmlu['mmlu_k_shot']}-shot)"
        )
    if ppl:
        retention.append(f"held-out perplexity (WikiText-2 test, {ppl['ppl_max_tokens']:,} tokens)")
    missing = [name for name, done in (("MMLU", mmlu), ("perplexity", ppl)) if not done]
    parts = ["ROUGE-L F1 (%) of each client's model on its own task's test items and their average"]
    if retention:
        text = " and ".join(retention) + " of the clients' models, averaged over clients"
        parts.append(text[0].upper() + text[1:])
    if missing:
        parts.append(f"{' and '.join(missing)}: not evaluated yet (`flexmoe evaluate RUN_DIR`)")
    parts.append(f"{spread}; best per column in bold (perplexity: lowest)")
    return ". ".join(parts) + "."

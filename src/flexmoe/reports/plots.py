"""The report's figures, saved as PNG files. Each returns its path, or None without data.

matplotlib's object-oriented API is used without pyplot: a `Figure` renders through the Agg
canvas on `savefig`, so no display, backend switch or global figure state is involved. Every
method keeps its colour across figures.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from flexmoe.reports.inputs import RunData

DPI = 130
BASE_COLOR = "#7f7f7f"
MAX_HEATMAP_LAYERS = 4
"""Routing heatmaps show at most this many MoE layers (first, last and evenly between)."""


LINE_STYLES = ("-", "--", "-.", ":")
"""Methods' lines differ in style too, so identical curves (e.g. two baselines shipping the
same bytes) stay visible on top of each other."""


def colors_for(names: list[str]) -> dict[str, tuple]:
    """A distinct colour per name, by position (methods keep theirs across figures)."""
    palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: palette(i % palette.N) for i, name in enumerate(names)}


def training_loss(
    runs: list[RunData], methods: list[str], clients: dict, path: Path
) -> Path | None:
    """One panel per method: each client's training loss per round (mean over seeds ± std)."""
    logged = [m for m in methods if any(m in run.rounds for run in runs)]
    if not logged:
        return None
    columns = min(3, len(logged))
    rows = math.ceil(len(logged) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows + 0.9), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    client_colors = colors_for(list(clients))
    for ax, method in zip(axes, logged, strict=False):
        losses: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for run in runs:
            for record in run.rounds.get(method, []):
                for cid, metrics in record["clients"].items():
                    losses[cid][record["round"]].append(metrics["train-loss"])
        for cid, name in clients.items():
            if cid in losses:
                _line_over_rounds(
                    ax, losses[cid], len(runs) > 1, label=name, color=client_colors[cid]
                )
        ax.set_title(method)
        ax.grid(alpha=0.3)
    for ax in axes[len(logged) :]:
        ax.set_visible(False)
    for position, ax in enumerate(axes[: len(logged)]):
        if position % columns == 0:
            ax.set_ylabel("training loss")
        if position + columns >= len(logged):  # no panel below: label this one's x axis
            ax.set_xlabel("round")
            ax.tick_params(labelbottom=True)
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
    fig.suptitle(f"Training loss per client and round ({_runs_text(runs)})")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(len(labels), 4), title="client"
    )
    return _save(fig, path)


def drift_over_rounds(runs: list[RunData], methods: list[str], path: Path) -> Path | None:
    """Per method, the JS divergence of the clients' routing from the base model's after each
    round's local training (as the clients measured it), mean over the clients of the round."""
    drift: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for method in methods:
            for record in run.rounds.get(method, []):
                values = [m["routing_js"] for m in record["clients"].values() if "routing_js" in m]
                if values:
                    drift[method][record["round"]].append(float(np.mean(values)))
    if not drift:
        return None
    colors = colors_for(methods)
    fig = Figure(figsize=(7.5, 4.4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for position, method in enumerate(methods):
        if method in drift:
            _line_over_rounds(
                ax,
                drift[method],
                len(runs) > 1,
                label=method,
                color=colors[method],
                linestyle=LINE_STYLES[position % len(LINE_STYLES)],
            )
    ax.set_ylim(bottom=0)
    ax.set_xlabel("round")
    ax.set_ylabel("JS divergence from the base model's routing (bits)")
    ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
    ax.set_title(f"Routing drift over rounds (mean over clients; {_runs_text(runs)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="method")
    return _save(fig, path)


def rouge_bars(summary: dict, path: Path) -> Path | None:
    """Grouped bars: ROUGE-L of each method per client task and on average (± std over seeds)."""
    methods, clients = summary["methods"], summary["clients"]
    groups = [*clients.values(), "average"]
    values = {
        m: [summary["client_metrics"][m].get(cid, {}).get("rougeL") for cid in clients]
        + [summary["metrics"][m].get("rougeL")]
        for m in methods
    }
    if not any(stat for row in values.values() for stat in row):
        return None
    return _grouped_bars(
        groups,
        values,
        colors_for(methods),
        title=f"ROUGE-L by client task and method ({_seeds_text(summary)})",
        ylabel="ROUGE-L F1 (%)",
        path=path,
    )


def drift_bars(summary: dict, path: Path) -> Path | None:
    """Grouped bars: JS divergence of each client's routing from the base model's, per method."""
    methods, clients = summary["methods"], summary["clients"]
    values = {
        m: [summary["client_metrics"][m].get(cid, {}).get("routing_js") for cid in clients]
        for m in methods
    }
    if not any(stat for row in values.values() for stat in row):
        return None
    return _grouped_bars(
        list(clients.values()),
        values,
        colors_for(methods),
        title=f"Routing drift after the final round ({_seeds_text(summary)})",
        ylabel="JS divergence from base (bits)",
        path=path,
    )


def cumulative_bytes(run: RunData, methods: list[str], path: Path) -> Path | None:
    """Cumulative bytes on the wire per method and round (log scale), from one run."""
    colors = colors_for(methods)
    fig = Figure(figsize=(7.5, 4.4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    plotted, last = 0, 0
    for method in methods:
        entry = run.results["methods"].get(method)
        if not entry or not entry["comm"]["per_round"]:
            continue
        rounds = [r["round"] for r in entry["comm"]["per_round"]]
        last = max(last, *rounds)
        cumulative = [r["cumulative_bytes"] / 1e6 for r in entry["comm"]["per_round"]]
        ratio = entry["comm"].get("ratio_to_fedavg")
        label = method if ratio is None else f"{method} ({ratio:.3g}× MoE+FedAvg)"
        ax.plot(
            rounds,
            cumulative,
            marker="o" if len(rounds) <= 25 else None,
            ms=3,
            label=label,
            color=colors[method],
            linestyle=LINE_STYLES[methods.index(method) % len(LINE_STYLES)],
        )
        plotted += 1
    if not plotted:
        return None
    ax.set_yscale("log")
    ax.set_xlabel("round (init: initial exchange; eval: final evaluation)")
    ax.set_ylabel("cumulative bytes (MB, log scale)")
    if last <= 25:  # name the two rounds that are not training rounds
        ax.set_xticks(range(last + 1), ["init", *map(str, range(1, last)), "eval"])
    else:
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
    ax.set_title(f"Cumulative communication per method (seed {run.seed})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(fig, path)


def routing_heatmaps(run: RunData, methods: list[str], clients: dict, path: Path) -> Path | None:
    """Expert load (share of a layer's top-k selections) per client: one row of panels per model
    (the base model first), one column per shown MoE layer, one colour scale for all."""
    models = []
    base = run.results.get("base", {}).get("routing")
    if base:
        models.append(("base model", base))
    models += [
        (m, run.results["methods"][m]["routing"])
        for m in methods
        if "routing" in run.results["methods"].get(m, {})
    ]
    if not models:
        return None
    cids = [cid for cid in clients if cid in models[0][1]["clients"]]
    first = models[0][1]["clients"][cids[0]]["profile"]
    layer_indices = first["layer_indices"]
    shown = _spread(len(layer_indices), MAX_HEATMAP_LAYERS)
    loads = {}
    for name, routing in models:
        for position in shown:
            counts = np.array(
                [routing["clients"][cid]["profile"]["counts"][position] for cid in cids], float
            )
            loads[name, position] = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    top = max(float(load.max()) for load in loads.values())
    experts = len(first["counts"][0])
    fig = Figure(
        figsize=(1.6 + 3.3 * len(shown), 0.8 + (0.3 * len(cids) + 0.75) * len(models)),
        dpi=DPI,
        layout="constrained",
    )
    axes = fig.subplots(len(models), len(shown), squeeze=False, sharex=True, sharey=True)
    image = None
    for row, (name, _) in enumerate(models):
        for column, position in enumerate(shown):
            ax = axes[row, column]
            image = ax.imshow(
                loads[name, position], aspect="auto", cmap="viridis", vmin=0, vmax=top
            )
            ax.set_title(f"{name} · layer {layer_indices[position]}", fontsize="small")
            ax.set_yticks(range(len(cids)), [clients[c] for c in cids], fontsize="x-small")
            step = max(1, math.ceil(experts / 16))
            ax.set_xticks(range(0, experts, step))
            ax.tick_params(axis="x", labelsize="x-small")
    for ax in axes[-1]:
        ax.set_xlabel("expert")
    fig.colorbar(image, ax=axes, label="share of the layer's selections", shrink=0.8)
    hidden = (
        ""
        if len(shown) == len(layer_indices)
        else f"; {len(shown)} of {len(layer_indices)} MoE layers shown"
    )
    fig.suptitle(f"Expert load per client on its test prompts (seed {run.seed}{hidden})")
    return _save(fig, path)


def _grouped_bars(
    groups: list[str],
    values: dict[str, list[dict | None]],
    colors: dict[str, tuple],
    *,
    title: str,
    ylabel: str,
    path: Path,
) -> Path:
    """Bars of each method (values[method][group] = {"mean", "std"} or None) side by side."""
    methods = list(values)
    width = 0.8 / len(methods)
    x = np.arange(len(groups))
    fig = Figure(
        figsize=(max(6.5, 1.1 * len(groups) * max(1, len(methods) / 3)), 4.4),
        dpi=DPI,
        layout="constrained",
    )
    ax = fig.subplots()
    for i, method in enumerate(methods):
        means = [s["mean"] if s else np.nan for s in values[method]]
        errors = [s["std"] if s and s["std"] is not None else 0.0 for s in values[method]]
        has_spread = any(s and s["std"] is not None for s in values[method])
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            means,
            width,
            label=method,
            color=colors[method],
            yerr=errors if has_spread else None,
            capsize=2,
        )
    ax.set_ylim(bottom=0)
    if not np.nanmax([s["mean"] if s else np.nan for row in values.values() for s in row]) > 0:
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "every value is 0", transform=ax.transAxes, ha="center", color="0.4")
    long_names = max(map(len, groups)) > 12
    ax.set_xticks(
        x, groups, rotation=15 if long_names else 0, ha="right" if long_names else "center"
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=min(len(methods), 4))
    return _save(fig, path)


def _line_over_rounds(ax: Axes, by_round: dict[int, list[float]], band: bool, **style) -> None:
    """The mean per round of the seeds' values; with `band`, ± their std shaded around it."""
    rounds = sorted(by_round)
    mean = np.array([np.mean(by_round[r]) for r in rounds])
    ax.plot(rounds, mean, marker="o" if len(rounds) <= 20 else None, ms=3, **style)
    if band:
        std = np.array(
            [np.std(by_round[r], ddof=1) if len(by_round[r]) > 1 else 0.0 for r in rounds]
        )
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.15, color=style["color"])


def _runs_text(runs: list[RunData]) -> str:
    return f"mean over {len(runs)} seeds, band ± std" if len(runs) > 1 else f"seed {runs[0].seed}"


def _spread(count: int, at_most: int) -> list[int]:
    """Up to `at_most` evenly spaced positions out of `count`, first and last included."""
    if count <= at_most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (at_most - 1)) for i in range(at_most)})


def _seeds_text(summary: dict) -> str:
    seeds = summary["seeds"]
    return f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

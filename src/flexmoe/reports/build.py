"""`flexmoe report`: one Markdown file and one self-contained HTML file from runs or a summary.

The sections, in order: overview, the paper's Table 1 (with the ROUGE-L figure), FLEx against
each baseline (paired tests), communication, training loss, routing, inference cost,
configuration and hashes, notes. A section whose data is absent says what to run instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe import __version__
from flexmoe.evaluation.run_eval import DRIFT_NOTE
from flexmoe.reports import plots
from flexmoe.reports.document import Bullets, Code, Figure, Section, Text
from flexmoe.reports.html import render_html
from flexmoe.reports.inputs import ReportInputs, Source, load_inputs
from flexmoe.reports.markdown import render_markdown
from flexmoe.reports.tables import (
    comm_table,
    comparison_table,
    format_stat,
    routing_table,
    runs_table,
    table1,
)

TITLE = "flexmoe report"
MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
FIGURES_DIR = "figures"


def build_report(source: Source, out_dir: str | Path) -> tuple[Path, Path]:
    """Write OUT_DIR/report.md (+ OUT_DIR/figures/*.png) and OUT_DIR/report.html.

    `source`: a run directory, a directory of seed runs, a list of run directories, a
    summary.json or a summary dict (see `flexmoe.reports.inputs`).
    """
    inputs = load_inputs(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = report_sections(inputs, out_dir / FIGURES_DIR)
    md_path, html_path = out_dir / MARKDOWN_FILE, out_dir / HTML_FILE
    md_path.write_text(render_markdown(TITLE, sections, out_dir), encoding="utf-8")
    html_path.write_text(render_html(TITLE, sections), encoding="utf-8")
    return md_path, html_path


def report_sections(inputs: ReportInputs, figures: Path) -> list[Section]:
    summary, runs = inputs.summary, inputs.runs
    return [
        _overview(summary),
        Section(
            "Results (Table 1 layout)",
            [
                table1(summary),
                _figure_or_note(
                    plots.rouge_bars(summary, figures / "rouge_l.png"),
                    "ROUGE-L F1 per client task and on average, per method.",
                    "No ROUGE scores in the runs.",
                ),
            ],
        ),
        _comparisons(summary),
        Section(
            "Communication",
            [
                comm_table(summary),
                _figure_or_note(
                    plots.cumulative_bytes(
                        runs[0], summary["methods"], figures / "cumulative_bytes.png"
                    )
                    if runs
                    else None,
                    "Cumulative bytes on the wire per method (log scale).",
                    "The run directories are not available: no per-round communication figure.",
                ),
            ],
        ),
        Section(
            "Training loss",
            [
                _figure_or_note(
                    plots.training_loss(
                        runs, summary["methods"], summary["clients"], figures / "training_loss.png"
                    ),
                    "Each client's mean training loss over its local steps, per round and method.",
                    "No rounds.jsonl found (the run directories are not available).",
                )
            ],
        ),
        _routing(summary, runs, figures),
        _cost(summary),
        Section(
            "Configuration and reproducibility",
            [
                Text(
                    f"Model {summary['model']}; partition {summary['partition_strategy']}; "
                    f"report by flexmoe {__version__}. Every run directory holds its resolved "
                    "configuration (config.resolved.json); the configuration hash and the "
                    "partition hash identify what was run and on which data split."
                ),
                runs_table(summary),
                Text("Resolved configuration shared by the runs (seed aside):"),
                Code(json.dumps(summary["config"], indent=2, sort_keys=True)),
            ],
        ),
        Section("Notes", [Bullets(_notes(summary, runs))]),
    ]


def _overview(summary: dict) -> Section:
    seeds = summary["seeds"]
    clients = ", ".join(f"{cid}: {name}" for cid, name in summary["clients"].items())
    return Section(
        "Overview",
        [
            Text(
                f"{len(summary['methods'])} method(s) on {len(summary['clients'])} clients "
                f"({clients}), {summary['partition_strategy']} partition, model "
                f"{summary['model']}, {len(seeds)} seed(s): {', '.join(map(str, seeds))}."
            ),
            Bullets([f"{m}: {summary['descriptions'][m]}" for m in summary["methods"]]),
        ],
    )


def _comparisons(summary: dict) -> Section:
    comparisons = summary["comparisons"]
    if not comparisons["metrics"]:
        return Section(
            f"{comparisons['reference']} against each baseline",
            [Bullets(comparisons["notes"] or ["no metric to compare"])],
        )
    return Section(
        f"{comparisons['reference']} against each baseline (paired tests)",
        [
            Text(
                f"Differences {comparisons['reference']} minus the other method on matched "
                f"{comparisons['pairs']} pairs: the same clients and test items on both sides."
            ),
            comparison_table(summary),
            Bullets(comparisons["notes"]),
        ],
    )


def _routing(summary: dict, runs: list, figures: Path) -> Section:
    over_rounds = _figure_or_note(
        plots.drift_over_rounds(runs, summary["methods"], figures / "routing_drift_rounds.png"),
        "Routing drift over rounds: JS divergence of each client's expert load from the base "
        "model's on its first eval.drift_samples test prompts, after its local training; mean "
        "over MoE layers and the round's clients.",
        "No per-round routing drift in the runs' rounds.jsonl (measured during training when "
        "eval.drift_samples > 0; the run directories must be available).",
    )
    evaluated = any("routing_js" in m for m in summary["metrics"].values())
    if not evaluated:
        return Section(
            "Routing",
            [
                over_rounds,
                Text("Routing statistics have not been evaluated: run `flexmoe evaluate RUN_DIR`."),
            ],
        )
    heatmaps = (
        plots.routing_heatmaps(
            runs[0], summary["methods"], summary["clients"], figures / "routing_heatmaps.png"
        )
        if runs
        else None
    )
    return Section(
        "Routing",
        [
            routing_table(summary),
            _figure_or_note(
                heatmaps,
                "Expert load: each row a client, each column an expert; colour = the expert's "
                "share of the layer's top-k selections on the client's test prompts.",
                "The run directories are not available: no routing heatmaps.",
            ),
            _figure_or_note(
                plots.drift_bars(summary, figures / "routing_drift.png"),
                "Jensen-Shannon divergence of each client's expert load from the base model's "
                "on the same prompts, mean over MoE layers.",
                "No routing drift values.",
            ),
            over_rounds,
            Text(DRIFT_NOTE[0].upper() + DRIFT_NOTE[1:] + "."),
        ],
    )


def _cost(summary: dict) -> Section:
    cost = summary.get("cost")
    if not cost:
        return Section(
            "Inference cost",
            [Text("Not measured: run `flexmoe evaluate RUN_DIR` on a run with a FLEx method.")],
        )
    seeds = len(summary["seeds"])
    lines = []
    for method, measured in cost["methods"].items():
        base = measured["base"]["active_params"]
        extra = measured["extra_active_params"]
        latency = measured["latency"]
        ratio = format_stat(summary["metrics"].get(method, {}).get("cost_latency_ratio"), 3)
        timing = (
            f"median over {latency['repeats']} repeat(s) of {latency['prompts']} prompts × "
            f"{latency['new_tokens']} new tokens, {latency['threads']} thread(s)"
        )
        if seeds > 1:
            timing = f"mean ± std over seeds of the per-seed {timing}"
        lines.append(
            f"{method}: the grafted expert(s) and gate(s) add {extra:,} active parameters per "
            f"token to the {base:,} of the model without them (+{100 * extra / base:.2f}%); "
            f"FLOPs per token ×{measured['flops_ratio']:.3f}. Measured greedy generation "
            f"latency ×{ratio} ({timing}; the first client's model against itself without the "
            "graft)."
        )
    return Section("Inference cost", [Bullets(lines)])


def _notes(summary: dict, runs: list) -> list[str]:
    notes = list(summary["notes"])
    missing = len(summary["runs"]) - len(runs)
    if missing:
        notes.append(
            f"{missing} run directory(ies) of the summary were not found: figures use the others"
        )
    for run in runs:
        for note in run.results.get("evaluation", {}).get("notes", []):
            if note not in notes:
                notes.append(note)
    return notes or ["none"]


def _figure_or_note(path: Path | None, caption: str, absent: str) -> Figure | Text:
    return Figure(path, caption) if path is not None else Text(absent)

"""`build_report` turns real runs (or a summary alone) into Markdown and self-contained HTML with
every section, valid PNG figures, and best values in bold."""

import base64
import io
import json
import re

import matplotlib.image
import pytest
from evaluated_runs import evaluated_run, run_copy

from flexmoe.evaluation.seeds import aggregate_runs
from flexmoe.reports import build_report
from flexmoe.reports.document import Section, Table, Text
from flexmoe.reports.html import render_html
from flexmoe.reports.inputs import ReportError
from flexmoe.reports.markdown import render_markdown
from flexmoe.reports.tables import table1

SECTIONS = (
    "Overview",
    "Results (Table 1 layout)",
    "flex against each baseline (paired tests)",
    "Communication",
    "Training loss",
    "Routing",
    "Inference cost",
    "Configuration and reproducibility",
    "Notes",
)
FIGURES = (
    "rouge_l.png",
    "cumulative_bytes.png",
    "training_loss.png",
    "routing_heatmaps.png",
    "routing_drift.png",
    "routing_drift_rounds.png",
)


@pytest.fixture(scope="module")
def run_dir(tiny_lm_dir, tmp_path_factory):
    return evaluated_run(tiny_lm_dir, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    md_path, html_path = build_report(run_dir, out)
    return out, md_path.read_text(), html_path.read_text()


def headings(markdown):
    return re.findall(r"^## (.+)$", markdown, flags=re.MULTILINE)


def routing_section(markdown):
    return markdown.split("## Routing\n", 1)[1].split("\n## ", 1)[0]


def test_every_section_in_both_formats(report, run_dir):
    _, markdown, html = report
    assert headings(markdown) == list(SECTIONS)
    assert re.findall(r"<h2>(.+?)</h2>", html) == [s.replace("&", "&amp;") for s in SECTIONS]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config_hash"] in markdown and results["config_hash"] in html
    assert results["partition"]["hash"][:16] in markdown
    table1_header = (
        "| method | closed_qa | information_extraction | classification | summarization "
        "| average | MMLU (%) | perplexity |"
    )
    assert table1_header in markdown
    for header in ("bytes per round", "vs MoE+FedAvg", "routing drift: JS from base (bits)"):
        assert header in markdown and header in html
    assert "FLOPs per token ×" in markdown
    assert "not evaluated" not in markdown
    routing = routing_section(markdown)
    for figure in ("routing_heatmaps.png", "routing_drift.png", "routing_drift_rounds.png"):
        assert f"](figures/{figure})" in routing


def test_figures_are_valid_pngs_linked_and_embedded(report):
    out, markdown, html = report
    for name in FIGURES:
        path = out / "figures" / name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert f"](figures/{name})" in markdown
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == len(FIGURES)
    for data in embedded:
        assert matplotlib.image.imread(io.BytesIO(base64.b64decode(data))).ndim == 3
    assert "figures/" not in html  # self-contained: no file links


def test_table1_numbers_and_bold_best(run_dir):
    summary = aggregate_runs([run_dir])
    table = table1(summary)
    methods = [row[0] for row in table.rows]
    assert methods == ["flex", "fedavg", "local", "base model"]
    perplexity = {row[0]: float(row[-1]) for row in table.rows}
    best = min(perplexity[m] for m in ("flex", "fedavg", "local"))
    bold_perplexity = {table.rows[r][0] for r, c in table.bold if c == len(table.header) - 1}
    assert bold_perplexity == {m for m in ("flex", "fedavg", "local") if perplexity[m] == best}
    results = json.loads((run_dir / "results.json").read_text())
    flex = results["methods"]["flex"]
    assert table.rows[0][1] == f"{flex['clients']['0']['rougeL']:.2f}"  # one seed: no "±"
    assert table.rows[0][-2] == f"{flex['retention']['mmlu']['mean']['accuracy']:.2f}"


def test_an_unevaluated_run_reports_what_is_missing(tiny_lm_dir, tmp_path_factory, tmp_path):
    run_dir = run_copy(tiny_lm_dir, tmp_path_factory.getbasetemp(), "unevaluated")
    md_path, _ = build_report(run_dir, tmp_path)
    markdown = md_path.read_text()
    assert headings(markdown) == list(SECTIONS)
    assert "MMLU and perplexity: not evaluated yet" in markdown
    assert "Routing statistics have not been evaluated" in markdown
    assert "Inference cost" in markdown and "Not measured" in markdown
    assert not (tmp_path / "figures" / "routing_heatmaps.png").exists()
    assert (tmp_path / "figures" / "training_loss.png").exists()
    # drift over rounds comes from training (rounds.jsonl), not from `flexmoe evaluate`
    assert "](figures/routing_drift_rounds.png)" in routing_section(markdown)


def test_a_summary_alone_builds_the_tables(run_dir, tmp_path):
    summary = aggregate_runs([run_dir])
    summary["runs"][0]["dir"] = str(tmp_path / "moved-away")
    md_path, _ = build_report(summary, tmp_path / "out")
    markdown = md_path.read_text()
    assert headings(markdown) == list(SECTIONS)
    assert "run directories are not available" in markdown
    assert "1 run directory(ies) of the summary were not found" in markdown
    with pytest.raises(ReportError, match="not a flexmoe summary"):
        build_report({"something": 1}, tmp_path / "bad")
    with pytest.raises(ReportError, match="neither a run directory"):
        build_report(tmp_path / "empty", tmp_path / "bad")


def test_renderers_escape_and_bold(tmp_path):
    sections = [
        Section(
            "A <b> section",
            [
                Text("x < y & z"),
                Table(["name", "value"], [["a|b", "1"], ["c", "2"]], bold={(1, 1)}),
            ],
        )
    ]
    html = render_html("t", sections)
    assert "<h2>A &lt;b&gt; section</h2>" in html and "<p>x &lt; y &amp; z</p>" in html
    assert '<td class="num"><strong>2</strong></td>' in html
    markdown = render_markdown("t", sections, tmp_path)
    assert "| a\\|b | 1 |" in markdown and "| c | **2** |" in markdown
    assert "|---|---:|" in markdown


@pytest.mark.parametrize("rounds", [1, 3])
def test_round_axes_show_whole_rounds_only(rounds, monkeypatch, tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from flexmoe.reports import plots
    from flexmoe.reports.inputs import RunData

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    records = [
        {"round": r, "clients": {"0": {"routing_js": 0.01 * r}}} for r in range(1, 1 + rounds)
    ]
    plots.drift_over_rounds([RunData(1, tmp_path, {}, {"flex": records})], ["flex"], tmp_path)
    (ax,) = figures[0].axes
    FigureCanvasAgg(figures[0]).draw()
    low, high = ax.get_xlim()
    visible = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert visible == list(range(1, 1 + rounds))


def test_table1_caption_names_what_was_evaluated_and_what_was_not():
    from flexmoe.reports.tables import _table1_caption

    caption = _table1_caption({"seeds": [1, 2], "evaluation": {"ppl": {"ppl_max_tokens": 512}}})
    assert "Held-out perplexity (WikiText-2 test, 512 tokens) of the clients' models" in caption
    assert "MMLU: not evaluated yet" in caption and "MMLU accuracy" not in caption

"""The command line: every command documents itself; bad input ends in one clear line, exit 2."""

import json

import pytest
from typer.testing import CliRunner

from flexmoe.cli import app, deep_merge, resolve_run_config, results_table

runner = CliRunner()
COMMANDS = ["run", "pretrain", "data", "select-experts", "inspect", "generate", "export"]


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_useful_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output and len(result.output.splitlines()) > 8


def test_help_shows_what_an_argument_is():
    # typer 0.20 with click >= 8.5 silently drops arguments' help (pinned in pyproject)
    result = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    assert "A run directory, a directory of seed runs, or a summary.json" in result.output


def test_data_command_shows_the_dolly_breakdown():
    result = runner.invoke(app, ["data", "dolly", "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "closed_qa" in result.output and "80" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "missing.jsonl"], "file not found"),
        (["data", "dolyy"], "did you mean 'dolly'"),
        (["data", "dolly", "--category", "poetry"], "unknown category"),
        (["data", "dolly", "--field", "nonsense"], "our_field=their_column"),
        (["run", "--methods", "flex,magic", "--out", "unused"], "unknown method"),
        (["run", "--set", "train.rounds=0", "--out", "unused"], "must be >= 1"),
        (["run", "--set", "eval.drift_samples=-1", "--out", "unused"], "drift_samples must be"),
        (["run", "--set", "nonsense=1", "--out", "unused"], "unknown option"),
        (["run", "--clients", "0", "--out", "unused"], "0 is not in the range x>=1"),
        (["run", "--jobs", "2", "--out", "unused"], "use it with --seeds"),
        (
            ["run", "--set", "eval.metrics=rouge,mmul", "--out", "unused"],
            "unknown eval.metrics mmul",
        ),
        (["run", "--set", "data.partition=domain", "--clients", "3"], "one client per domain"),
        (
            ["run", "--clients", "3", "--set", "data.categories=[closed_qa,summarization]"],
            "2 categories are named",
        ),
        (["run", "--max-new-tokens", "300", "--out", "unused"], "leaves 20 prompt tokens"),
        (["pretrain", "--set", "hidden=3"], "unknown option"),
    ],
)
def test_bad_input_gives_one_clear_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "unused").exists()  # nothing is written for a rejected run


def test_run_config_precedence_preset_file_flags_set(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: some/model\ntrain:\n  rounds: 7\n  lr: 0.5\nseed: 3\n")
    flags = {"seed": 9, "train": {"rounds": None, "local_steps": 2}}
    cfg = resolve_run_config(config_file, flags, ["train.lr=0.25"], preset=None)
    assert cfg.model == "some/model"  # from the file
    assert cfg.train.rounds == 7  # file beats the preset ("paper": 50); a None flag changes nothing
    assert cfg.seed == 9 and cfg.train.local_steps == 2  # flags beat the file
    assert cfg.train.lr == 0.25  # --set beats everything
    assert cfg.train.batch_size == 4  # the paper preset for a non-built-in model


def test_deep_merge_keeps_untouched_keys():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3, "d": None}}) == {
        "a": {"b": 1, "c": 3}
    }


def test_run_refuses_to_overwrite_a_run_directory(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({}))
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "old")])
    assert result.exit_code == 2
    assert "--resume" in result.output


def test_set_values_parse_as_numbers_booleans_and_lists():
    from flexmoe.config import parse_value

    assert parse_value("1e-3") == 0.001  # YAML 1.1 alone would keep the string
    assert parse_value("4") == 4 and parse_value("true") is True
    assert parse_value("[a, b]") == ["a", "b"] and parse_value("flex") == "flex"
    # where a list is expected, a string is a comma-separated list (and names are checked)
    cfg = resolve_run_config(None, {}, ["eval.metrics=rouge, ppl", "methods=flex"], None)
    assert cfg.eval.metrics == ("rouge", "ppl") and cfg.methods == ("flex",)


def _results(n_clients: int) -> dict:
    clients = {str(i): {"name": f"task{i}"} for i in range(n_clients)}
    comm = {"total_bytes": 2_000_000, "ratio_to_full_model": 0.03}
    scores = {str(i): {"rougeL": 10.0 + i} for i in range(n_clients)}
    average = {"rougeL": sum(s["rougeL"] for s in scores.values()) / n_clients}
    method = {"clients": scores, "average": average, "comm": comm}
    return {"seed": 0, "partition": {"clients": clients}, "methods": {"flex": method}}


def _rendered(table) -> str:
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(table)
    return console.export_text()


def test_results_table_has_a_column_per_client_for_a_few_clients():
    text = _rendered(results_table(_results(4)))
    assert all(f"task{i}" in text for i in range(4)) and "worst client" not in text
    assert "13.00" in text and "11.50" in text  # the last client and the average


def test_results_table_summarises_many_clients_by_worst_and_best():
    text = _rendered(results_table(_results(20)))
    assert "task0" not in text and "worst client" in text and "best client" in text
    row = next(line for line in text.splitlines() if "flex" in line)
    assert "10.00" in row and "29.00" in row and "19.50" in row  # min, max, mean of 10..29

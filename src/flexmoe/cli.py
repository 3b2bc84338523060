"""The `flexmoe` command line: one typer app, one short function per command.

Commands only parse options and print; the work lives in the library modules they call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexmoe import config as config_io
from flexmoe.runtime import configure_threads, console, output, set_quiet

app = typer.Typer(
    help="flexmoe: personalized federated fine-tuning of Mixture-of-Experts LLMs (FLEx).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML or YAML file of options (see README).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override an option: --set key=value (repeatable, dotted keys)."),
]


@app.callback()
def main(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print results.")] = False,
    threads: Annotated[
        int | None,
        typer.Option(help="torch CPU threads (default: $FLEXMOE_THREADS or the number of cores)."),
    ] = None,
) -> None:
    set_quiet(quiet)
    configure_threads(threads)


def fail(message: str) -> typer.Exit:
    """Print a one-line error a user can act on and exit with status 2 (no traceback)."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(2)


def parse_field_map(items: list[str] | None) -> dict[str, str]:
    """`--field instruction=question` pairs to a field map (our field -> their column)."""
    mapping = {}
    for item in items or []:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours or not theirs:
            raise fail(f"--field {item!r} is not of the form our_field=their_column")
        mapping[ours.strip()] = theirs.strip()
    return mapping


FieldOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--field",
        help="Map a field to a column of your file: --field instruction=question (repeatable).",
    ),
]
DataArg = Annotated[
    str,
    typer.Argument(
        help="A bundled set (dolly, alpaca, alpaca_gpt4, code_alpaca, medical, instruct), "
        "a local JSON/JSONL/CSV/Parquet file, or a Hugging Face dataset id."
    ),
]


@app.command()
def data(
    source: DataArg = "dolly",
    split: Annotated[str | None, typer.Option(help="Keep one split (train / test).")] = None,
    category: Annotated[
        list[str] | None, typer.Option(help="Keep these categories (repeatable).")
    ] = None,
    field: FieldOpt = None,
) -> None:
    """Show a dataset's size and its category / domain breakdown."""
    from flexmoe.data import DataError, data_table

    try:
        table = data_table(
            source, split=split, categories=category, field_map=parse_field_map(field)
        )
    except DataError as err:
        raise fail(str(err)) from None
    output.print(table)


def resolve_run_config(
    config_file: Path | None, flags: dict, overrides: list[str] | None, preset: str | None
):
    """preset < config file < command-line flags < --set overrides -> a validated RunConfig."""
    from flexmoe.federated.config import PRESETS, RunConfig

    data = config_io.read_config_file(config_file) if config_file else {}
    model = flags.get("model") or data.get("model", "default")
    preset = preset or ("tiny" if model == "default" else "paper")
    if preset not in PRESETS:
        raise fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    merged = deep_merge(deep_merge(PRESETS[preset], data), flags)
    merged = config_io.apply_overrides(merged, overrides or [])
    return config_io.build(RunConfig, merged)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict):
            merged = deep_merge(out.get(key) or {}, value)
            if merged:
                out[key] = merged
        elif value is not None:
            out[key] = value
    return out


def results_table(results: dict) -> Table:
    """Per method: ROUGE-L per client task, the average, and communication totals."""
    methods = results["methods"]
    clients = results["partition"]["clients"]
    table = Table(title=f"ROUGE-L (%) per client task, seed {results['seed']}")
    table.add_column("method")
    for client in clients.values():
        table.add_column(client["name"], justify="right")
    table.add_column("average", justify="right", style="bold")
    table.add_column("comm total", justify="right")
    table.add_column("bytes vs MoE+FedAvg", justify="right")
    best = max((m["average"].get("rougeL", -1) for m in methods.values()), default=None)
    for name, m in methods.items():
        avg = m["average"].get("rougeL")
        ratio = m["comm"]["ratio_to_full_model"]
        table.add_row(
            name,
            *(f"{m['clients'].get(pid, {}).get('rougeL', float('nan')):.2f}" for pid in clients),
            (f"[green]{avg:.2f}" if avg == best else f"{avg:.2f}") if avg is not None else "-",
            human_bytes(m["comm"]["total_bytes"]),
            f"{ratio:.3f}" if ratio is not None else "-",
        )
    return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


@app.command()
def run(
    methods: Annotated[
        str | None,
        typer.Option(help="Comma-separated methods, or 'all' (default: flex,fedavg,fedavgm,local)."),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    clients: Annotated[int | None, typer.Option(help="Clients (dirichlet / iid).")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Local steps per round.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Local batch size.")] = None,
    eval_samples: Annotated[int | None, typer.Option(help="Test items evaluated per client.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length at evaluation.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Hub id or local model directory (default: built-in tiny MoE).")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Dataset: bundled name, local file or hub id.")] = None,
    partition: Annotated[
        str | None, typer.Option(help="pathological | dirichlet | domain | iid | natural.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of partition, sampling and training.")] = None,
    preset: Annotated[
        str | None, typer.Option(help="tiny (default for the built-in model) or paper.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<time>).")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run from its directory.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Federated fine-tuning: FLEx against baselines, ending with a per-client results table."""
    import time

    from flexmoe.federated.run import RunDirError, prepare_run_dir, run_methods

    flags = {
        "model": model,
        "seed": seed,
        "methods": methods.split(",") if methods else None,
        "train": {"rounds": rounds, "local_steps": local_steps, "batch_size": batch_size},
        "data": {"source": data, "partition": partition, "clients": clients},
        "eval": {"samples": eval_samples, "max_new_tokens": max_new_tokens},
    }
    try:
        if resume is not None:
            run_dir = resume
            cfg = prepare_run_dir(run_dir, None, resume=True)
        else:
            cfg = resolve_run_config(config, flags, set_, preset)
            run_dir = out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
            prepare_run_dir(run_dir, cfg, resume=False)
        console.log(f"run directory: {run_dir}")
        results = run_methods(cfg, run_dir)
    except (config_io.ConfigError, RunDirError, ValueError) as err:
        raise fail(str(err)) from None
    output.print(results_table(results))
    output.print(f"results: {run_dir / 'results.json'}")

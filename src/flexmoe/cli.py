"""The `flexmoe` command line: one typer app, one short function per command.

Commands only parse options and print; the work lives in the library modules they call.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from transformers.utils import logging as hf_logging

from flexmoe import config as config_io
from flexmoe.runtime import configure_threads, console, output, set_quiet

app = typer.Typer(
    help="flexmoe: personalized federated fine-tuning of Mixture-of-Experts LLMs (FLEx).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
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
        typer.Option(
            min=1, help="torch CPU threads (default: $FLEXMOE_THREADS or the number of cores)."
        ),
    ] = None,
) -> None:
    set_quiet(quiet)
    configure_threads(threads)
    hf_logging.disable_progress_bar()
    logging.getLogger("flwr").propagate = False  # Flower logs once, through its own handler
    warnings.showwarning = show_warning


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (e.g. skipped records) as one readable line, without source context."""
    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


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


MAX_CLIENT_COLUMNS = 6
"""Beyond this many clients the table shows the worst and best client instead of one column each."""


def results_table(results: dict) -> Table:
    """Per method: ROUGE-L per client task (or worst/best client), the average, communication."""
    methods = results["methods"]
    clients = results["partition"]["clients"]
    per_client = len(clients) <= MAX_CLIENT_COLUMNS
    table = Table(title=f"ROUGE-L (%) per client task, seed {results['seed']}")
    table.add_column("method")
    names = [c["name"] for c in clients.values()] if per_client else ["worst client", "best client"]
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("average", justify="right", style="bold")
    table.add_column("comm total", justify="right")
    table.add_column("bytes / full-model round", justify="right")
    best = max((m["average"].get("rougeL", -1) for m in methods.values()), default=None)
    for name, m in methods.items():
        avg = m["average"].get("rougeL")
        ratio = m["comm"]["ratio_to_full_model"]
        scores = [m["clients"].get(pid, {}).get("rougeL", float("nan")) for pid in clients]
        if not per_client:
            known = [s for s in scores if s == s] or [float("nan")]
            scores = [min(known), max(known)]
        table.add_row(
            name,
            *(f"{score:.2f}" for score in scores),
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
        typer.Option(
            help="Comma-separated methods, or 'all' (default: flex,fedavg,fedavgm,local)."
        ),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    clients: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Clients (dirichlet, iid; pathological: the paper's 4 Dolly tasks, else the "
            "data's N largest categories).",
        ),
    ] = None,
    local_steps: Annotated[int | None, typer.Option(help="Local steps per round.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Local batch size.")] = None,
    eval_samples: Annotated[
        int | None, typer.Option(help="Test items evaluated per client.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Generation length at evaluation.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Hub id or local model directory (default: built-in tiny MoE)."),
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Dataset: bundled name, local file or hub id.")
    ] = None,
    partition: Annotated[
        str | None, typer.Option(help="pathological | dirichlet | domain | iid | natural.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of partition, sampling and training.")
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Several seeds, e.g. 1,2,3: one run per seed (`OUT/seed-S`), then "
            "OUT/summary.json with mean ± std and FLEx-vs-baseline tests. Run it again with the "
            "same --out to continue."
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="With --seeds: run this many seeds at once as separate processes sharing "
            "--threads (on a CPU, 1-thread runs side by side finish more work per hour); each "
            "process loads its own model, so memory grows N-fold.",
        ),
    ] = 1,
    preset: Annotated[
        str | None, typer.Option(help="tiny (default for the built-in model) or paper.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: `runs/TIME`).")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run from its directory.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Federated fine-tuning: FLEx against baselines, ending with a per-client results table."""
    from flexmoe.federated.run import (
        RunDirError,
        check_new_run_dir,
        prepare_run_dir,
        run_methods,
    )
    from flexmoe.federated.server import NoClientTrainedError

    flags = {
        "model": model,
        "seed": seed,
        "methods": methods.split(",") if methods else None,
        "train": {"rounds": rounds, "local_steps": local_steps, "batch_size": batch_size},
        "data": {"source": data, "partition": partition, "clients": clients},
        "eval": {"samples": eval_samples, "max_new_tokens": max_new_tokens},
    }
    if resume is not None:
        given = [k for k, v in flags.items() if v not in (None, {}) and not isinstance(v, dict)]
        given += [k for k, v in flags.items() if isinstance(v, dict) and any(v.values())]
        if given or config or set_ or preset or out or seeds:
            raise fail(
                "--resume continues a run exactly as it was configured: drop the other options "
                f"(got {', '.join(given) or 'config/--set/--out/--seeds'}), or start a new run"
            )
    run_dir = resume or out
    try:
        if seeds is not None:
            if seed is not None:
                raise fail("--seeds replaces --seed")
            cfg = resolve_run_config(config, flags, set_, preset)
            check_clients_flag(cfg, clients)
            cfg = check_run_inputs(cfg)
            run_several_seeds(parse_seeds(seeds), cfg, out, jobs)
            return
        if jobs > 1:
            raise fail("--jobs runs several seeds at once: use it with --seeds")
        if resume is not None:
            run_dir = resume
            cfg = prepare_run_dir(run_dir, None, resume=True)
        else:
            cfg = resolve_run_config(config, flags, set_, preset)
            check_clients_flag(cfg, clients)
            run_dir = out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
            check_new_run_dir(run_dir)  # before the inputs: checking them may build the base model
            prepare_run_dir(run_dir, check_run_inputs(cfg), resume=False)
        console.log(f"run directory: {run_dir}")
        results = run_methods(cfg, run_dir)
        from flexmoe.evaluation.run_eval import evaluate_configured

        evaluate_configured(cfg, run_dir)
    except KeyboardInterrupt:
        hint = f"; continue with: flexmoe run --resume {run_dir}" if run_dir else ""
        raise fail(f"interrupted{hint}") from None
    except (config_io.ConfigError, RunDirError, ValueError, NoClientTrainedError) as err:
        raise fail(str(err)) from None
    output.print(results_table(results))
    output.print(f"results: {run_dir / 'results.json'}")


def check_clients_flag(cfg, clients: int | None) -> None:
    """`--clients N` must mean N clients: refused where the partition fixes the count itself."""
    if clients is None:
        return
    d = cfg.data
    if d.partition in ("domain", "natural"):
        raise fail(
            f"--clients applies to the pathological, dirichlet and iid partitions; the "
            f"{d.partition} partition has one client per domain / FedIT client"
        )
    if d.partition == "pathological" and d.categories and len(d.categories) != clients:
        raise fail(
            f"--clients {clients}, but {len(d.categories)} categories are named "
            f"({', '.join(d.categories)}) and the pathological partition gives one client per "
            "category: drop --clients, or name as many categories"
        )


def check_run_inputs(cfg):
    """Fail before a run directory exists: local paths made absolute, data partitioned, model
    architecture checked (on the meta device, no weights read)."""
    from flexmoe.federated import task
    from flexmoe.models.loading import check_supported, load_config

    for value, set_value in (
        (cfg.model, lambda v: setattr(cfg, "model", v)),
        (cfg.data.source, lambda v: setattr(cfg.data, "source", v)),
    ):
        if value != "default" and Path(value).expanduser().exists():
            set_value(str(Path(value).expanduser().resolve()))
    check_supported(load_config(task.model_source(cfg)))
    task.partition_for(cfg)
    return cfg


def run_several_seeds(seeds: list[int], cfg, out: Path | None, jobs: int) -> None:
    """`flexmoe run --seeds`: one run per seed under OUT, then the summary over seeds."""
    from flexmoe.evaluation.seeds import run_seeds
    from flexmoe.federated.parallel import ParallelRunError
    from flexmoe.reports.tables import table1
    from flexmoe.reports.terminal import rich_table

    out = out or Path("runs") / time.strftime("seeds-%Y%m%d-%H%M%S")
    console.log(f"runs of seeds {', '.join(map(str, seeds))} under {out}")
    try:
        summary = run_seeds(cfg, seeds, out, jobs=jobs)
    except KeyboardInterrupt:
        raise fail(f"interrupted; continue with the same command and --out {out}") from None
    except (config_io.ConfigError, ValueError, ParallelRunError) as err:
        raise fail(str(err)) from None
    output.print(rich_table(table1(summary), title=f"ROUGE-L per task over seeds {seeds}"))
    output.print(f"summary: {out / 'summary.json'}; next: flexmoe evaluate {out}")


@app.command()
def pretrain(
    out: Annotated[
        Path | None,
        typer.Option(help="Model directory (default: the built-in model's cache directory)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default 0).")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Training steps (default: the recipe's).")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Rebuild even if a finished build is cached.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build flexmoe's base model: a BPE tokenizer and a small Qwen2-MoE trained from scratch.

    Without options this builds (once, about 10 minutes on 2 CPU cores) the built-in default
    model every other command uses, and prints its held-out perplexity and location.
    """
    from flexmoe.models.default_model import is_complete, model_dir_for
    from flexmoe.models.pretrain import PretrainConfig, read_metadata
    from flexmoe.models.pretrain import pretrain as run_pretrain

    flags = [f"seed={seed}"] * (seed is not None) + [f"steps={steps}"] * (steps is not None)
    try:
        cfg = config_io.load(PretrainConfig, config, [*flags, *(set_ or [])])
        cfg.validate()
    except config_io.ConfigError as err:
        raise fail(str(err)) from None
    target = out or model_dir_for(cfg)
    if not force and is_complete(target, cfg):
        console.log(f"already built (use --force to rebuild): {target}")
    else:
        run_pretrain(cfg, target)
    meta = read_metadata(target)
    output.print(
        f"held-out perplexity {meta['heldout']['perplexity']:.1f} "
        f"({meta['heldout']['bits_per_byte']:.3f} bits/byte) on WikiText-2 test; "
        f"{meta['num_parameters'] / 1e6:.1f}M parameters; saved to {target}"
    )


@app.command("select-experts")
def select_experts_command(
    model: Annotated[
        str, typer.Option(help="Hub id or local model directory; 'default' = built-in.")
    ] = "default",
    data: Annotated[str, typer.Option(help="Bundled set, local file or hub id.")] = "dolly",
    category: Annotated[list[str] | None, typer.Option(help="Keep these categories.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration examples.")] = 32,
    max_length: Annotated[int, typer.Option(help="Token length of calibration examples.")] = 256,
    r: Annotated[int, typer.Option("--r", help="Experts to keep per layer.")] = 1,
    strategy: Annotated[
        str, typer.Option(help="reconstruction | random | most-routed.")
    ] = "reconstruction",
    seed: Annotated[int, typer.Option(help="Seed (sampling of calibration data, random).")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    field: FieldOpt = None,
) -> None:
    """Score every expert of every MoE layer on local data and print FLEx's choice.

    The score is the reconstruction error ||Z - Z_e||_F of the layer output when the router may
    only pick expert e (lower is better); the chosen expert is the grafting source.
    """
    import random

    from flexmoe.data import DataError, build_prompt, load_instructions
    from flexmoe.flex import FlexConfig, FlexError, select_experts
    from flexmoe.models.default_model import ensure_default_model
    from flexmoe.models.loading import load_model

    try:
        cfg = FlexConfig(
            strategy=strategy,
            r=r,
            calibration_samples=samples,
            calibration_max_length=max_length,
            seed=seed,
        )
        source = str(ensure_default_model()) if model == "default" else model
        loaded = load_model(source)
        records = load_instructions(
            data, split="train", categories=category, field_map=parse_field_map(field)
        )
        random.Random(seed).shuffle(records)
        texts = [build_prompt(rec) + rec.response for rec in records[:samples]]
        batches = [
            loaded.tokenizer(
                texts[i : i + 8],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            for i in range(0, len(texts), 8)
        ]
        selections = select_experts(loaded.model, batches, cfg)
    except (config_io.ConfigError, DataError, FlexError, ValueError) as err:
        raise fail(str(err)) from None
    if json_out:
        payload = {
            str(i): {
                "selected": s.selected,
                "scores": s.scores,
                "candidates": s.candidates,
                "score": s.score_name,
                "search": s.search,
                "tokens": s.tokens,
            }
            for i, s in selections.items()
        }
        output.print_json(json.dumps(payload))
        return
    table = Table(title=f"{strategy} selection on {data}, {samples} examples (r={r})")
    table.add_column("layer", justify="right")
    table.add_column("selected", style="bold")
    table.add_column("scores (lower is better)" if strategy == "reconstruction" else "scores")
    for i, s in selections.items():
        ranked = sorted(
            zip(s.scores, s.candidates, strict=True), reverse=s.score_name != "reconstruction_error"
        )
        shown = ", ".join(f"{c}: {v:.3g}" for v, c in ranked[:8])
        table.add_row(str(i), str(s.selected), shown + (" ..." if len(ranked) > 8 else ""))
    output.print(table)


@app.command()
def inspect(
    model: Annotated[
        str, typer.Option(help="Hub id or local model directory; 'default' = built-in.")
    ] = "default",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show a model's MoE structure and its parameters per role (what a FLEx round ships)."""
    from flexmoe.models.default_model import ensure_default_model
    from flexmoe.models.loading import load_model
    from flexmoe.moe import describe
    from flexmoe.moe.roles import role_table

    try:
        source = str(ensure_default_model()) if model == "default" else model
        loaded = load_model(source, require_tokenizer=False, device="cpu")
    except ValueError as err:
        raise fail(str(err)) from None
    structure = describe(loaded.model)
    roles = role_table(loaded.model)
    total = sum(s.numel for s in roles.values())
    if json_out:
        payload = {
            "structure": structure,
            "roles": {
                str(r): {"tensors": s.count, "parameters": s.numel, "bytes": s.bytes}
                for r, s in roles.items()
            },
        }
        output.print_json(json.dumps(payload, default=str))
        return
    output.print(structure)
    table = Table(title=f"parameters per role ({total:,} in all)")
    for column in ("role", "tensors", "parameters", "share", "bytes"):
        table.add_column(column, justify="left" if column == "role" else "right")
    for role, stats in roles.items():
        table.add_row(
            str(role),
            str(stats.count),
            f"{stats.numel:,}",
            f"{stats.numel / total:.2%}",
            human_bytes(stats.bytes),
        )
    output.print(table)


RunDirArg = Annotated[Path, typer.Argument(help="A run directory written by `flexmoe run`.")]
MethodOpt = Annotated[str, typer.Option(help="The run's method whose model to use.")]
ClientOpt = Annotated[str, typer.Option(help="Client id or name (e.g. 0 or closed_qa).")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(help="Where the clients kept their state, if not RUN_DIR/state (deployed runs)."),
]


@app.command()
def generate(
    run_dir: RunDirArg,
    prompt: Annotated[str, typer.Argument(help="The instruction to answer.")],
    method: MethodOpt = "flex",
    client: ClientOpt = "0",
    context: Annotated[str, typer.Option(help="Input the instruction refers to.")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 128,
    state_dir: StateDirOpt = None,
) -> None:
    """Answer a prompt with one client's personalised model from a finished run."""
    from flexmoe.federated.artifacts import generate_text

    try:
        answer = generate_text(
            run_dir, method, client, prompt, max_new_tokens, context, state_dir=state_dir
        )
    except ValueError as err:
        raise fail(str(err)) from None
    output.print(answer, markup=False, highlight=False)


@app.command()
def export(
    run_dir: RunDirArg,
    out: Annotated[Path, typer.Option(help="Directory to write (must not exist or be empty).")],
    method: MethodOpt = "flex",
    client: ClientOpt = "0",
    state_dir: StateDirOpt = None,
) -> None:
    """Write one client's model as a standalone directory: a Hugging Face checkpoint (base +
    aggregated shared weights) and, for FLEx, the client's personal state."""
    from flexmoe.evaluation.export import export_client_model

    try:
        path = export_client_model(run_dir, method, client, out, state_dir=state_dir)
    except ValueError as err:
        raise fail(str(err)) from None
    output.print(
        f"exported client {client} of {method} to {path} "
        "(load it with flexmoe.evaluation.export.load_exported)"
    )


def parse_seeds(text: str) -> list[int]:
    """`--seeds 1,2,3` to [1, 2, 3]."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise fail(
            f"--seeds {text!r} is not a comma-separated list of integers (e.g. 1,2,3)"
        ) from None
    if not seeds:
        raise fail("--seeds needs at least one seed (e.g. --seeds 1,2,3)")
    return seeds


@app.command()
def evaluate(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A run directory, or a directory of seed runs (`flexmoe run --seeds`)."
        ),
    ],
    metrics: Annotated[
        str,
        typer.Option(
            help="Comma-separated: rouge (recomputed only where missing), mmlu, ppl, routing, cost."
        ),
    ] = "rouge,mmlu,ppl,routing,cost",
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated methods (default: every finished one).")
    ] = None,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Knowledge retention (MMLU, held-out perplexity), routing drift and the graft's inference
    cost of every client's model, added to the run's results.json (settings: --set
    mmlu_per_subject=4, ppl_max_tokens=16384, ...; see flexmoe.evaluation.run_eval.EvalSettings)."""
    from flexmoe.evaluation.run_eval import EvalSettings, evaluate_run
    from flexmoe.evaluation.seeds import aggregate_runs, find_run_dirs, write_summary
    from flexmoe.reports.tables import table1
    from flexmoe.reports.terminal import rich_table

    try:
        settings = config_io.load(EvalSettings, config, set_)
        run_dirs = find_run_dirs(run_dir)
        for directory in run_dirs:
            console.rule(f"evaluating {directory}")
            evaluate_run(
                directory,
                metrics.split(","),
                settings,
                methods=methods.split(",") if methods else None,
                state_dir=state_dir,
            )
        summary = aggregate_runs(run_dirs)
        if run_dirs != [run_dir]:  # a directory of seed runs: refresh its summary
            output.print(f"summary: {write_summary(run_dir, summary)}")
    except (config_io.ConfigError, ValueError) as err:
        raise fail(str(err)) from None
    output.print(rich_table(table1(summary), title="ROUGE-L per task, MMLU and perplexity"))
    output.print(f"next: flexmoe report {run_dir}")


@app.command()
def report(
    source: Annotated[
        Path,
        typer.Argument(help="A run directory, a directory of seed runs, or a summary.json."),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output directory (default: report/ inside SOURCE, or beside a summary)."
        ),
    ] = None,
) -> None:
    """Write report.md (+ figures/) and a self-contained report.html: Table 1, FLEx vs each
    baseline, communication, training loss, routing, inference cost, configuration and hashes."""
    from flexmoe.reports import build_report

    target = out or (source.parent if source.is_file() else source) / "report"
    try:
        md_path, html_path = build_report(source, target)
    except ValueError as err:
        raise fail(str(err)) from None
    output.print(f"report: {md_path}\n        {html_path}")

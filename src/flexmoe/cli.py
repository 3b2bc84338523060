"""The `flexmoe` command line: one typer app, one short function per command.

Commands only parse options and print; the work lives in the library modules they call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexmoe.runtime import configure_threads, console, set_quiet

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
    console.print(table)

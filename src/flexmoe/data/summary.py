"""A table of what a dataset holds (counts by category x split and by domain): `flexmoe data`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from rich.table import Table

from flexmoe.data.loaders import load_instructions
from flexmoe.data.records import InstructionRecord


def summarize(records: Sequence[InstructionRecord], title: str = "") -> Table:
    """Record counts per category and split, then per domain and split, then the totals."""
    splits = sorted({r.split for r in records}, key=lambda s: (s != "train", s != "test", s))
    table = Table(
        title=f"{title} ({len(records):,} records)" if title else f"{len(records):,} records"
    )
    table.add_column("by")
    table.add_column("name")
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")

    def add_rows(by: str, key: str) -> None:
        counts = Counter((getattr(r, key), r.split) for r in records)
        for name in sorted({getattr(r, key) for r in records}):
            per_split = [counts[name, split] for split in splits]
            table.add_row(
                by, name or "(none)", *[f"{n:,}" for n in per_split], f"{sum(per_split):,}"
            )
        table.add_section()

    add_rows("category", "category")
    add_rows("domain", "domain")
    split_totals = Counter(r.split for r in records)
    table.add_row("all", "", *[f"{split_totals[s]:,}" for s in splits], f"{len(records):,}")
    return table


def data_table(
    source: str,
    split: str | None = None,
    categories: Sequence[str] | None = None,
    field_map: Mapping[str, str] | None = None,
) -> Table:
    """Load `source` as `load_instructions` would and summarize it (the `flexmoe data` command)."""
    records = load_instructions(source, split=split, categories=categories, field_map=field_map)
    return summarize(records, title=source)

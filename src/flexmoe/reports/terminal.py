"""Render a report table for the terminal (rich), e.g. Table 1 after `flexmoe run --seeds`."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table as RichTable

from flexmoe.reports.document import Table


def rich_table(table: Table, title: str | None = None) -> RichTable:
    out = RichTable(title=title, caption=table.caption or None, caption_justify="left")
    for column, header in enumerate(table.header):
        out.add_column(header, justify="right" if table.is_numeric(column) else "left")
    for r, row in enumerate(table.rows):
        out.add_row(
            *(
                f"[bold green]{escape(text)}[/]" if (r, c) in table.bold else escape(text)
                for c, text in enumerate(row)
            )
        )
    return out

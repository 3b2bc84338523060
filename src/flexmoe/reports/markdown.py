"""Render a report's sections as GitHub-flavoured Markdown (figures linked relative to the file)."""

from __future__ import annotations

import os
from pathlib import Path

from flexmoe.reports.document import Block, Bullets, Code, Figure, Section, Table, Text


def render_markdown(title: str, sections: list[Section], out_dir: Path) -> str:
    """The whole report; figure links are relative to `out_dir`, where the file is written."""
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += [_block(block, out_dir) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def _block(block: Block, out_dir: Path) -> str:
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Code):
        return f"```\n{block.text}\n```"
    if isinstance(block, Figure):
        link = Path(os.path.relpath(block.path, out_dir)).as_posix()
        return f"![{block.caption}]({link})\n\n*{block.caption}*"
    if isinstance(block, Table):
        return _table(block)
    raise TypeError(f"cannot render {type(block).__name__} as Markdown")


def _table(table: Table) -> str:
    def cell(row: int, column: int, text: str) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if (row, column) in table.bold and text else text

    lines = [
        "| " + " | ".join(table.header) + " |",
        "|"
        + "|".join("---:" if table.is_numeric(c) else "---" for c in range(len(table.header)))
        + "|",
    ]
    lines += [
        "| " + " | ".join(cell(r, c, t) for c, t in enumerate(row)) + " |"
        for r, row in enumerate(table.rows)
    ]
    if table.caption:
        lines += ["", table.caption]
    return "\n".join(lines)

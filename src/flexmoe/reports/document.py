"""A report as plain data — sections of text, tables, figures and code — rendered twice.

The Markdown and HTML renderers (`markdown.py`, `html.py`) both walk the same `Section` list, so
the two files always hold the same content; only the presentation differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Text:
    """A paragraph of plain text (renderers escape it)."""

    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    """(row, column) of the cells shown in bold (e.g. the best value of a column)."""
    caption: str = ""
    numeric: list[bool] | None = None
    """Per column: right-aligned; default: every column but the first."""

    def is_numeric(self, column: int) -> bool:
        return self.numeric[column] if self.numeric is not None else column > 0


@dataclass
class Figure:
    path: Path
    """A PNG file (Markdown links to it; HTML embeds it)."""
    caption: str


@dataclass
class Code:
    text: str


Block = Text | Bullets | Table | Figure | Code


@dataclass
class Section:
    title: str
    blocks: list[Block]

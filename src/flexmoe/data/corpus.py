"""Plain-text documents to pretrain a tiny model from scratch, and a held-out set for perplexity.

`train` is Tiny Shakespeare + 30 Wikipedia articles + 300 C4 web documents (about 2.9 MB);
`heldout` is WikiText-2 (raw) test, which is never trained on, so perplexity on it measures
generalisation rather than memorisation.
"""

from __future__ import annotations

import json
import re

from flexmoe.data.bundled import read_bundled_text
from flexmoe.data.records import DataError

CORPUS_PARTS = ("train", "heldout")
SHAKESPEARE_CHUNK_CHARS = 4000
"""Tiny Shakespeare is one 1.1 MB file; cut at line boundaries into documents of about this size."""

_WIKITEXT_TITLE = re.compile(
    r"^ = [^=].* = $", re.MULTILINE
)  # " = Title = ", not " = = Section = = "


def corpus_documents(part: str) -> list[str]:
    """The documents of `part`: "train" (pretraining text) or "heldout" (WikiText-2 articles)."""
    if part == "train":
        return [
            *_chunk_lines(read_bundled_text("corpus/tinyshakespeare.txt"), SHAKESPEARE_CHUNK_CHARS),
            *[line for line in read_bundled_text("corpus/wikipedia_demo.txt").split("\n") if line],
            *[
                json.loads(line)["text"]
                for line in read_bundled_text("corpus/c4_demo.jsonl").split("\n")
                if line
            ],
        ]
    if part == "heldout":
        return _split_wikitext_articles(read_bundled_text("corpus/wikitext2_raw_test.txt"))
    raise DataError(f"unknown corpus part {part!r}; choose one of {', '.join(CORPUS_PARTS)}")


def _chunk_lines(text: str, chunk_chars: int) -> list[str]:
    """Consecutive runs of whole lines, each closed once it reaches `chunk_chars` characters."""
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


def _split_wikitext_articles(text: str) -> list[str]:
    """Cut WikiText at its ` = Title = ` lines; each piece starts with its title line.

    The test split gives 62 pieces: its 60 articles, one of which (Constant k filter) holds two
    formula lines that have the title form.
    """
    starts = [match.start() for match in _WIKITEXT_TITLE.finditer(text)]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]

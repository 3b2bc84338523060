"""MMLU (test, 5-shot dev) and MMLU-Redux multiple-choice items from the bundled copies.

Used to measure knowledge retention after federated fine-tuning: FLEx's claim is that keeping the
routed experts frozen and local preserves what the pretrained model knew.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from flexmoe.data.bundled import read_bundled_jsonl, read_bundled_text
from flexmoe.data.records import DataError

_SPLIT_FILES = {
    "test": tuple(f"mmlu/mmlu_test.part{i}of3.jsonl" for i in (1, 2, 3)),
    "dev": ("mmlu/mmlu_dev.jsonl",),
    "redux": tuple(f"mmlu/mmlu_redux.part{i}of2.jsonl" for i in (1, 2)),
}
MMLU_SPLITS = tuple(_SPLIT_FILES)
"""`test` (14,042 questions), `dev` (5 exemplars per subject, for few-shot prompts), `redux`
(MMLU-Redux: 100 re-annotated test questions per subject)."""


@dataclass(frozen=True)
class MMLUItem:
    """One question: `answer` indexes `choices` (A-D); `category` is one of MMLU's 4 categories."""

    id: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int
    category: str


def mmlu_categories() -> dict[str, str]:
    """Subject -> its standard category (STEM, humanities, social sciences, other ...)."""
    return dict(_categories())


@cache
def _categories() -> dict[str, str]:
    subjects = json.loads(read_bundled_text("mmlu/mmlu_subjects.json"))["subjects"]
    return {subject: info["category"] for subject, info in subjects.items()}


def load_mmlu(
    split: str = "test",
    subjects: Sequence[str] | None = None,
    *,
    redux_clean_only: bool = False,
) -> list[MMLUItem]:
    """The items of `split` (in file order), optionally only some `subjects`.

    `redux_clean_only` keeps the MMLU-Redux questions its annotators found sound
    (`error_type == "ok"`, 5,330 of 5,700); the error type itself is not part of `MMLUItem`.
    """
    if split not in _SPLIT_FILES:
        raise DataError(f"unknown MMLU split {split!r}; choose one of {', '.join(MMLU_SPLITS)}")
    if redux_clean_only and split != "redux":
        raise DataError(f"redux_clean_only applies to split='redux', not {split!r}")
    categories = _categories()
    if isinstance(subjects, str):  # one name, not a sequence of its letters
        subjects = [subjects]
    if subjects is not None:
        unknown = sorted(set(subjects) - set(categories))
        if unknown:
            raise DataError(
                f"unknown MMLU subject(s) {', '.join(unknown)}; known: {', '.join(categories)}"
            )
    wanted = set(subjects) if subjects is not None else set(categories)
    return [
        MMLUItem(
            id=row["id"],
            subject=row["subject"],
            question=row["question"],
            choices=tuple(row["choices"]),
            answer=row["answer"],
            category=categories[row["subject"]],
        )
        for path in _SPLIT_FILES[split]
        for row in read_bundled_jsonl(path)
        if row["subject"] in wanted and (not redux_clean_only or row["error_type"] == "ok")
    ]

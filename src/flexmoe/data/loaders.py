"""Load instruction data from a bundled set, a local file or a Hugging Face dataset id.

All three routes end in the same row -> `InstructionRecord` conversion, so a user's own file or a
Hub dataset behaves exactly like the bundled Dolly: Dolly-style (instruction/context/response) and
Alpaca-style (instruction/input/output) columns are recognised, anything else is named through
`field_map`. Rows without an instruction or response are skipped with one warning giving the count.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmoe.data.bundled import bundled_record_count, read_bundled_jsonl
from flexmoe.data.records import DataError, DataWarning, InstructionRecord

_DOLLY_CATEGORIES = (
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
)
_MEDICAL_FILES = (
    "instruct/medical_meadow_wikidoc_patient_info.part1of2.jsonl",
    "instruct/medical_meadow_wikidoc_patient_info.part2of2.jsonl",
)


@dataclass(frozen=True)
class BundledSet:
    """A shipped instruction set: its files (manifest paths), what it is, and its licence."""

    files: tuple[str, ...]
    description: str
    licence: str

    @property
    def records(self) -> int:
        return sum(bundled_record_count(path) or 0 for path in self.files)


_BUNDLED_SETS: dict[str, BundledSet] = {
    "dolly": BundledSet(
        tuple(f"dolly15k/dolly_{category}.jsonl" for category in _DOLLY_CATEGORIES),
        "databricks-dolly-15k, 8 task categories, train/test split (10 test per category), "
        "FedIT 10-client partition in `fedit_client`",
        "CC BY-SA 3.0",
    ),
    "alpaca": BundledSet(
        ("instruct/alpaca_stanford_subset.jsonl",),
        "Stanford Alpaca subset (general domain)",
        "CC BY-NC 4.0 (non-commercial)",
    ),
    "alpaca_gpt4": BundledSet(
        ("instruct/alpaca_gpt4_subset.jsonl",),
        "Alpaca instructions with GPT-4 responses, 1k subset (general domain)",
        "CC BY-NC 4.0 (non-commercial)",
    ),
    "code_alpaca": BundledSet(
        ("instruct/code_alpaca_2k.jsonl",),
        "Code Alpaca 2k pilot sample (code domain)",
        "CC BY-NC 4.0 (non-commercial)",
    ),
    "medical": BundledSet(
        _MEDICAL_FILES,
        "Medical Meadow WikiDoc patient information Q/A (medical domain)",
        "CC BY-SA 3.0 (WikiDoc)",
    ),
}
_BUNDLED_SETS["instruct"] = BundledSet(
    tuple(
        f
        for name in ("alpaca", "alpaca_gpt4", "code_alpaca", "medical")
        for f in _BUNDLED_SETS[name].files
    ),
    "all four domain sets together (alpaca, alpaca_gpt4, code_alpaca, medical); "
    "`domain` is general/code/medical",
    "CC BY-NC 4.0 (Alpaca family), CC BY-SA 3.0 (medical)",
)

BUNDLED_INSTRUCTION_SETS: tuple[str, ...] = tuple(_BUNDLED_SETS)
"""Short names accepted by `load_instructions` for the instruction sets shipped with flexmoe."""

_DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    # our field: the column names recognised without a field_map (Dolly's first, then Alpaca's)
    "instruction": ("instruction",),
    "response": ("response", "output"),
    "context": ("context", "input"),
    "category": ("category",),
    "domain": ("domain",),
    "id": ("id",),
    "split": ("split",),
    "fedit_client": ("fedit_client",),
}
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def bundled_instruction_sets() -> dict[str, BundledSet]:
    """Every bundled instruction set by short name, with description and licence (for help text)."""
    return dict(_BUNDLED_SETS)


def load_instructions(
    source: str,
    *,
    split: str | None = None,
    categories: Sequence[str] | None = None,
    field_map: Mapping[str, str] | None = None,
    hf_split: str = "train",
) -> list[InstructionRecord]:
    """Load instruction records from `source` and keep those of `split` and `categories`.

    `source` is, in this order: a bundled short name (`BUNDLED_INSTRUCTION_SETS`); a local file
    (.json array, .jsonl, .csv, .parquet, or .json/.jsonl/.csv with .gz); or a Hugging Face
    dataset id, loaded with `datasets.load_dataset(source, split=hf_split)`.

    For files and Hub datasets, `field_map` maps our field to their column (e.g.
    {"instruction": "question", "response": "answer"}); without such a column, `category` and
    `domain` default to the file's stem, `id` to `<stem>-<row>` and `split` to "train".
    """
    if source in _BUNDLED_SETS:
        if field_map:
            raise DataError(
                f"field_map does not apply to the bundled set {source!r}, which already uses "
                "flexmoe's field names; drop field_map or pass a file path"
            )
        rows = [row for path in _BUNDLED_SETS[source].files for row in read_bundled_jsonl(path)]
        records = _rows_to_records(rows, stem=source, where=f"bundled set {source!r}")
    elif Path(source).is_file():
        path = Path(source)
        records = _rows_to_records(
            _read_rows(path), stem=_stem(path), where=str(path), field_map=field_map
        )
    elif Path(source).suffix.lower() in (*_FILE_SUFFIXES, ".gz"):
        raise DataError(
            f"file not found: {source} (check the path; relative paths start at {Path.cwd()})"
        )
    else:
        near = difflib.get_close_matches(source, BUNDLED_INSTRUCTION_SETS, n=1, cutoff=0.75)
        if near and "/" not in source:  # a typo: fail now, not after the Hub's retries
            raise DataError(
                f"{source!r} is not a bundled set; did you mean {near[0]!r}? "
                f"Bundled sets: {', '.join(BUNDLED_INSTRUCTION_SETS)}"
            )
        rows = _load_hub_rows(source, hf_split)
        records = _rows_to_records(
            rows, stem=source.rstrip("/").split("/")[-1], where=source, field_map=field_map
        )
    return _select(records, split=split, categories=categories, where=source)


def _select(
    records: list[InstructionRecord],
    *,
    split: str | None,
    categories: Sequence[str] | None,
    where: str,
) -> list[InstructionRecord]:
    if isinstance(categories, str):  # one name, not a sequence of its letters
        categories = [categories]
    if categories is not None:
        available = sorted({r.category for r in records})
        unknown = sorted(set(categories) - set(available))
        if unknown:
            raise DataError(
                f"{where}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                f"{', '.join(unknown)}; available: {', '.join(available)}"
            )
        wanted = set(categories)
        records = [r for r in records if r.category in wanted]
    if split is not None:
        available = sorted({r.split for r in records})
        if split not in available:
            raise DataError(
                f"{where}: no records in split {split!r}; available splits: {', '.join(available)}"
            )
        records = [r for r in records if r.split == split]
    if not records:
        raise DataError(
            f"{where}: no records left after selecting categories {list(categories or [])}"
        )
    return records


def _stem(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return name.rsplit(".", 1)[0]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Parse a local file into row dicts; a parse failure becomes a DataError naming the spot."""
    name = path.name.lower().removesuffix(".gz")
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix == ".parquet":
        if path.name.lower().endswith(".gz"):
            raise DataError(
                f"{path}: parquet is already compressed; pass the .parquet file unzipped"
            )
        return _read_parquet(path)
    if suffix not in _FILE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type; use .json (an array of objects), .jsonl, .csv or "
            ".parquet (json/jsonl/csv may be gzipped as .gz)"
        )
    try:
        raw = (
            gzip.decompress(path.read_bytes())
            if path.name.lower().endswith(".gz")
            else path.read_bytes()
        )
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read the file ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); re-save it as UTF-8") from None
    if suffix == ".json":
        return _parse_json(text, path)
    if suffix == ".jsonl":
        return _parse_jsonl(text, path)
    return _parse_csv(text, path)


def _parse_json(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(
            f"{path}: expected a JSON array of objects "
            "(for one object per line, name the file .jsonl)"
        )
    return data


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    # split("\n"), not splitlines(): fields may hold a raw U+2028 or U+0085, where splitlines cuts.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {line_number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
    return rows


def _parse_csv(text: str, path: Path) -> list[dict[str, Any]]:
    # Long Dolly-style contexts exceed csv's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": as the csv docs require
    try:
        return list(reader)
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read as parquet ({err})") from None


def _load_hub_rows(source: str, hf_split: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset; any failure becomes one DataError naming all three routes."""
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=hf_split)
    except Exception as err:  # the hub raises many types (HTTP, offline, missing split, scripts)
        raise DataError(
            f"{source!r} is not a bundled name ({', '.join(BUNDLED_INSTRUCTION_SETS)}), "
            f"not an existing file, and the Hugging Face Hub could not load it: "
            f"{type(err).__name__}: {err}"
        ) from None
    return list(dataset)


def _resolve_columns(
    columns: set[str], field_map: Mapping[str, str] | None, where: str
) -> dict[str, str]:
    """Our field -> their column, from `field_map` first, else the Dolly/Alpaca default names."""
    field_map = dict(field_map or {})
    unknown_fields = sorted(set(field_map) - set(_DEFAULT_COLUMNS))
    if unknown_fields:
        raise DataError(
            f"field_map has unknown field(s) {', '.join(unknown_fields)}; "
            f"map these fields to your columns: {', '.join(_DEFAULT_COLUMNS)}"
        )
    missing = sorted(column for column in field_map.values() if column not in columns)
    if missing:
        raise DataError(
            f"{where}: field_map names column(s) {', '.join(missing)} that the data does not have; "
            f"its columns are: {', '.join(sorted(columns))}"
        )
    resolved = {}
    for field, candidates in _DEFAULT_COLUMNS.items():
        column = field_map.get(field) or next((c for c in candidates if c in columns), None)
        if column is not None:
            resolved[field] = column
    for required in ("instruction", "response"):
        if required not in resolved:
            raise DataError(
                f"{where}: no column for {required!r} (looked for "
                f"{' or '.join(_DEFAULT_COLUMNS[required])}); its columns are: "
                f"{', '.join(sorted(columns))}; name yours with field_map, e.g. "
                "{'instruction': 'question', 'response': 'answer'}"
            )
    return resolved


def _rows_to_records(
    rows: list[dict[str, Any]],
    *,
    stem: str,
    where: str,
    field_map: Mapping[str, str] | None = None,
) -> list[InstructionRecord]:
    if not rows:
        raise DataError(f"{where}: the data has no rows")
    columns = {key for row in rows for key in row}
    column = _resolve_columns(columns, field_map, where)

    def value(row: dict[str, Any], field: str) -> Any:
        return row.get(column[field]) if field in column else None

    def text(row: dict[str, Any], field: str, default: str = "") -> str:
        found = value(row, field)
        return default if found is None else str(found)

    records, skipped = [], 0
    for index, row in enumerate(rows):
        instruction, response = text(row, "instruction"), text(row, "response")
        if not instruction.strip() or not response.strip():
            skipped += 1
            continue
        records.append(
            InstructionRecord(
                instruction=instruction,
                response=response,
                context=text(row, "context"),
                category=text(row, "category", stem),
                domain=text(row, "domain", stem),
                id=text(row, "id", f"{stem}-{index}"),
                split=text(row, "split", "train"),
                fedit_client=_optional_int(value(row, "fedit_client"), where, index),
            )
        )
    if not records:
        raise DataError(
            f"{where}: no usable rows: all {len(rows)} lack an instruction "
            f"({column['instruction']!r}) or a response ({column['response']!r}); "
            "check the column names or pass field_map"
        )
    if skipped:
        warnings.warn(
            f"{where}: skipped {skipped} of {len(rows)} rows with an empty or missing instruction "
            f"({column['instruction']!r}) or response ({column['response']!r})",
            DataWarning,
            stacklevel=3,
        )
    return records


def _optional_int(value: Any, where: str, index: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}, row {index}: fedit_client {value!r} is not an integer") from None

"""The data layer: bundled files intact, loaders faithful to the data README, clear errors."""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import shutil
import warnings

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from flexmoe.data import (
    BUNDLED_INSTRUCTION_SETS,
    DataError,
    DataWarning,
    bundled_files,
    bundled_instruction_sets,
    corpus_documents,
    data_table,
    load_instructions,
    load_mmlu,
    mmlu_categories,
    read_bundled_bytes,
    read_bundled_text,
    summarize,
)
from flexmoe.data import bundled as bundled_module

# From the bundled data README (dolly15k table).
DOLLY_COUNTS = {
    "brainstorming": 1766,
    "classification": 2136,
    "closed_qa": 1769,
    "creative_writing": 707,
    "general_qa": 2188,
    "information_extraction": 1504,
    "open_qa": 3737,
    "summarization": 1188,
}


@pytest.fixture(scope="module")
def dolly():
    return load_instructions("dolly")


# --- bundled files -------------------------------------------------------------------------------


def test_every_bundled_file_matches_its_manifest(monkeypatch):
    monkeypatch.setattr(bundled_module, "_verified", set())  # force the SHA-256 check on each
    manifest = json.loads((bundled_module.BUNDLED_DIR / "manifest.json").read_text())["files"]
    assert sorted(entry["path"] for entry in manifest) == bundled_files()
    assert len(manifest) == 24
    for entry in manifest:
        data = read_bundled_bytes(entry["path"])
        assert len(data) == entry["bytes"]
        if "records" in entry:
            assert data.count(b"\n") == entry["records"]
    assert len(bundled_module._verified) == 24


def _copy_bundle(tmp_path, *relative_paths):
    """A minimal bundle in tmp_path: the manifest plus some compressed files."""
    shutil.copy(bundled_module.BUNDLED_DIR / "manifest.json", tmp_path / "manifest.json")
    for relative_path in relative_paths:
        (tmp_path / relative_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(
            bundled_module.BUNDLED_DIR / f"{relative_path}.gz", tmp_path / f"{relative_path}.gz"
        )
    return tmp_path / f"{relative_paths[0]}.gz"


def test_a_corrupted_bundled_file_is_detected(tmp_path, monkeypatch):
    copy = _copy_bundle(tmp_path, "mmlu/mmlu_dev.jsonl", "mmlu/mmlu_subjects.json")
    text = gzip.decompress(copy.read_bytes()).replace(b'"answer": 1', b'"answer": 2', 1)
    copy.write_bytes(gzip.compress(text))
    monkeypatch.setattr(bundled_module, "BUNDLED_DIR", tmp_path)
    monkeypatch.setattr(bundled_module, "_verified", set())
    with pytest.raises(DataError, match=r"mmlu_dev\.jsonl\.gz is corrupt.*reinstall flexmoe"):
        load_mmlu("dev")


def test_an_intact_copy_passes_and_a_missing_file_is_reported(tmp_path, monkeypatch):
    _copy_bundle(tmp_path, "mmlu/mmlu_dev.jsonl", "mmlu/mmlu_subjects.json")
    monkeypatch.setattr(bundled_module, "BUNDLED_DIR", tmp_path)
    monkeypatch.setattr(bundled_module, "_verified", set())
    assert len(load_mmlu("dev")) == 285
    with pytest.raises(DataError, match=r"mmlu_test\.part1of3\.jsonl\.gz is missing or corrupt"):
        load_mmlu("test")


# --- bundled instruction sets --------------------------------------------------------------------


def test_dolly_counts_match_the_data_readme(dolly):
    assert len(dolly) == 14995
    assert collections.Counter(r.category for r in dolly) == DOLLY_COUNTS
    test_counts = collections.Counter(r.category for r in dolly if r.split == "test")
    assert test_counts == dict.fromkeys(DOLLY_COUNTS, 10)
    assert len({r.id for r in dolly}) == len(dolly)


def test_dolly_keeps_the_fedit_partition(dolly):
    assert all(r.fedit_client is None for r in dolly if r.split == "test")
    per_client = collections.Counter(r.fedit_client for r in dolly if r.split == "train")
    assert sorted(per_client) == list(range(10))
    assert min(per_client.values()) >= 1489 and max(per_client.values()) <= 1494
    closed_qa = collections.Counter(
        r.fedit_client for r in dolly if r.category == "closed_qa" and r.split == "train"
    )
    assert closed_qa == {0: 598, 4: 746, 8: 415}  # README: "0:598, 4:746, 8:415"


def test_split_and_category_filters():
    assert len(load_instructions("dolly", split="test", categories="closed_qa")) == 10
    records = load_instructions("dolly", split="test", categories=["closed_qa", "summarization"])
    assert len(records) == 20
    assert {(r.category, r.split) for r in records} == {
        ("closed_qa", "test"),
        ("summarization", "test"),
    }


def test_domain_sets_load_with_their_domains_and_warn_about_empty_responses():
    with pytest.warns(DataWarning, match=r"skipped 5 of 16256 rows"):
        records = load_instructions("instruct")
    assert collections.Counter(r.domain for r in records) == {
        "general": 7404 + 985,
        "code": 2015,
        "medical": 5847,
    }
    assert set(BUNDLED_INSTRUCTION_SETS) == {
        "dolly",
        "alpaca",
        "alpaca_gpt4",
        "code_alpaca",
        "medical",
        "instruct",
    }
    described = bundled_instruction_sets()
    assert described["medical"].records == 5847 and "CC BY-SA" in described["medical"].licence
    assert described["instruct"].records == 16256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": ["poetry"]}, r"unknown category poetry; available: brainstorming, .*"),
        (
            {"split": "validation"},
            r"no records in split 'validation'; available splits: test, train",
        ),
        ({"field_map": {"instruction": "q"}}, r"field_map does not apply to the bundled set"),
    ],
)
def test_bad_selections_on_a_bundled_set(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_instructions("dolly", **kwargs)


def test_a_typo_in_a_bundled_name_is_caught_without_the_hub(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _must_not_be_called)
    with pytest.raises(DataError, match=r"did you mean 'dolly'"):
        load_instructions("doly")


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("the Hub must not be asked")


# --- local files ---------------------------------------------------------------------------------

ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Say hi in French.", "input": "", "output": "Bonjour"},
]


def _write(path, rows):
    """Write rows in the format the file name asks for."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if name.endswith(".jsonl"):
        text = "".join(json.dumps(row) + "\n" for row in rows)
    elif name.endswith(".json"):
        text = json.dumps(rows, indent=1)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize(
    "name",
    ["tasks.json", "tasks.jsonl", "tasks.jsonl.gz", "tasks.json.gz", "tasks.csv", "tasks.parquet"],
)
def test_alpaca_style_files_load_with_fields_mapped(tmp_path, name):
    records = load_instructions(str(_write(tmp_path / name, ALPACA_ROWS)))
    assert [(r.instruction, r.context, r.response) for r in records] == [
        ("Add the numbers.", "2, 3", "5"),
        ("Name a colour.", "", "Blue."),
        ("Say hi in French.", "", "Bonjour"),
    ]
    assert {(r.category, r.domain, r.split, r.fedit_client) for r in records} == {
        ("tasks", "tasks", "train", None)
    }
    assert [r.id for r in records] == ["tasks-0", "tasks-1", "tasks-2"]


def test_dolly_style_columns_are_kept(tmp_path):
    rows = [
        {
            "id": f"x{i}",
            "instruction": "Q?",
            "context": "C",
            "response": "A",
            "category": "qa" if i % 2 else "chat",
            "domain": "med",
            "split": "test" if i == 0 else "train",
        }
        for i in range(4)
    ]
    path = _write(tmp_path / "mine.csv", rows)
    records = load_instructions(str(path), split="train", categories=["qa"])
    assert [(r.id, r.category, r.domain, r.split, r.context) for r in records] == [
        ("x1", "qa", "med", "train", "C"),
        ("x3", "qa", "med", "train", "C"),
    ]


def test_field_map_names_other_columns(tmp_path):
    rows = [{"question": "Capital of France?", "answer": "Paris", "topic": "geo"}]
    path = _write(tmp_path / "quiz.jsonl", rows)
    field_map = {"instruction": "question", "response": "answer", "category": "topic"}
    (record,) = load_instructions(str(path), field_map=field_map)
    assert (record.instruction, record.response, record.category, record.domain) == (
        "Capital of France?",
        "Paris",
        "geo",
        "quiz",
    )
    with pytest.raises(DataError, match=r"no column for 'instruction'.*question.*field_map"):
        load_instructions(str(path))
    with pytest.raises(DataError, match=r"names column\(s\) prompt .* columns are: answer"):
        load_instructions(str(path), field_map={"instruction": "prompt", "response": "answer"})
    with pytest.raises(DataError, match=r"unknown field\(s\) answer; map these fields"):
        load_instructions(str(path), field_map={"answer": "answer"})


def test_rows_without_a_response_are_skipped_with_one_warning(tmp_path):
    rows = [*ALPACA_ROWS, {"instruction": "Empty.", "input": "", "output": "  "}]
    rows.append({"instruction": "Missing.", "input": ""})
    path = _write(tmp_path / "gaps.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = load_instructions(str(path))
    assert len(records) == 3
    assert [str(w.message) for w in caught if issubclass(w.category, DataWarning)] == [
        f"{path}: skipped 2 of 5 rows with an empty or missing instruction ('instruction') "
        "or response ('output')"
    ]
    assert [r.id for r in records] == ["gaps-0", "gaps-1", "gaps-2"]


def test_malformed_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"file not found: .*nope\.jsonl"):
        load_instructions(str(tmp_path / "nope.jsonl"))

    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "out\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_instructions(str(bad_line))

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n {"instruction": "a",\n  "output": }\n]')
    with pytest.raises(DataError, match=r"bad\.json, line 3: not valid JSON"):
        load_instructions(str(bad_json))

    not_array = _write(tmp_path / "obj.json", ALPACA_ROWS[0])
    with pytest.raises(DataError, match=r"expected a JSON array of objects"):
        load_instructions(str(not_array))

    unusable = _write(tmp_path / "blank.jsonl", [{"instruction": "x", "output": ""}] * 3)
    with pytest.raises(DataError, match=r"no usable rows: all 3 lack an instruction"):
        load_instructions(str(unusable))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the data has no rows"):
        load_instructions(str(empty))

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type; use \.json"):
        load_instructions(str(text))

    latin1 = tmp_path / "latin.csv"
    latin1.write_bytes("instruction,output\ncaf\xe9,ok\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text"):
        load_instructions(str(latin1))


def test_jsonl_fields_may_hold_unicode_line_separators(tmp_path):
    rows = [{"instruction": "a\u2028b", "output": "c\x85d"}]
    path = tmp_path / "seps.jsonl"
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    (record,) = load_instructions(str(path))
    assert (record.instruction, record.response) == ("a\u2028b", "c\x85d")


# --- Hugging Face Hub (never contacted: load_dataset is replaced) --------------------------------


def test_hub_datasets_go_through_the_same_conversion(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ALPACA_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_instructions("someone/alpaca-like", hf_split="train[:3]")
    assert calls == [("someone/alpaca-like", "train[:3]")]
    assert [r.response for r in records] == ["5", "Blue.", "Bonjour"]
    assert records[0].id == "alpaca-like-0" and records[0].category == "alpaca-like"


def test_hub_failures_become_one_clear_error(monkeypatch):
    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as caught:
        load_instructions("someone/missing")
    assert str(caught.value) == (
        "'someone/missing' is not a bundled name (dolly, alpaca, alpaca_gpt4, code_alpaca, "
        "medical, instruct), not an existing file, and the Hugging Face Hub could not load it: "
        "ConnectionError: Couldn't reach 'someone/missing' on the Hub"
    )


# --- MMLU ----------------------------------------------------------------------------------------


def test_mmlu_counts_and_categories():
    test = load_mmlu("test")
    assert len(test) == 14042
    assert len(load_mmlu("dev")) == 285
    assert len(load_mmlu("redux")) == 5700
    assert len(load_mmlu("redux", redux_clean_only=True)) == 5330
    assert collections.Counter(item.category for item in test) == {
        "STEM": 3018,
        "humanities": 4705,
        "social sciences": 3077,
        "other (business, health, misc.)": 3242,
    }
    assert len(mmlu_categories()) == 57
    assert all(len(item.choices) == 4 and 0 <= item.answer < 4 for item in test)
    assert len({item.id for item in test}) == 14042
    law = load_mmlu("test", subjects=["professional_law", "moral_scenarios"])
    assert collections.Counter(item.subject for item in law) == {
        "professional_law": 1534,
        "moral_scenarios": 895,
    }


def test_mmlu_item_fields():
    first = load_mmlu("dev", subjects=["abstract_algebra"])[0]
    assert first.question == "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field."
    assert first.choices == ("0", "1", "2", "3") and first.answer == 1
    assert first.category == "STEM" and first.id == "mmlu-dev-abstract_algebra-0000"


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("val",), {}, r"unknown MMLU split 'val'; choose one of test, dev, redux"),
        (("test", ["astrology"]), {}, r"unknown MMLU subject\(s\) astrology; known: abstract_"),
        (("test",), {"redux_clean_only": True}, r"redux_clean_only applies to split='redux'"),
    ],
)
def test_mmlu_bad_arguments(args, kwargs, message):
    with pytest.raises(DataError, match=message):
        load_mmlu(*args, **kwargs)


# --- corpus --------------------------------------------------------------------------------------


def test_train_corpus_covers_its_three_sources_exactly():
    documents = corpus_documents("train")
    shakespeare = read_bundled_text("corpus/tinyshakespeare.txt")
    chunks = documents[: len(documents) - 330]
    assert "".join(chunks) == shakespeare
    assert all(chunk.endswith("\n") for chunk in chunks)
    assert all(4000 <= len(chunk) < 4000 + 200 for chunk in chunks[:-1])
    assert documents[-330].startswith("Anarchism is a political philosophy")
    assert documents[-300].startswith("Don’t think you need all the bells and whistles?")


def test_heldout_corpus_is_wikitext_articles_and_not_in_train():
    articles = corpus_documents("heldout")
    assert "".join(articles) == read_bundled_text("corpus/wikitext2_raw_test.txt")
    assert len(articles) == 62
    assert articles[0].startswith(" = Robert Boulter = \n")
    assert articles[-1].startswith(" = The Hustler ( film ) = \n")
    train = corpus_documents("train")
    assert not any(" = Robert Boulter = " in doc or "Du Fu" in doc for doc in train)
    with pytest.raises(
        DataError, match=r"unknown corpus part 'test'; choose one of train, heldout"
    ):
        corpus_documents("test")


# --- summary -------------------------------------------------------------------------------------


def test_summary_table_counts(dolly):
    table = summarize(dolly, title="dolly")
    assert [column.header for column in table.columns] == ["by", "name", "train", "test", "total"]
    assert table.row_count == 8 + 1 + 1  # categories, domains, all
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    text = console.file.getvalue()
    assert "dolly (14,995 records)" in text
    assert "closed_qa" in text and "1,759" in text and "1,769" in text and "14,915" in text
    small = data_table("dolly", split="test", categories=["open_qa"])
    assert small.row_count == 3 and small.title == "dolly (10 records)"

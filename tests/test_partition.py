"""Partitions are disjoint, complete, seeded, and skewed the way each strategy promises."""

import contextlib
import math
from collections import Counter

import pytest

from flexmoe.data.loaders import load_instructions
from flexmoe.data.records import DataError, DataWarning, InstructionRecord
from flexmoe.federated import partition as partition_module
from flexmoe.federated.partition import PAPER_CATEGORIES, Partition, make_partition

CATEGORY_SIZES = {"closed_qa": 400, "information_extraction": 300, "classification": 500,
                  "summarization": 250, "open_qa": 350, "brainstorming": 200}  # fmt: skip


def synthetic_records() -> list[InstructionRecord]:
    """Records of 6 categories and 3 domains; the first 10 of each category marked test."""
    records = []
    for category, size in CATEGORY_SIZES.items():
        for i in range(size):
            records.append(
                InstructionRecord(
                    instruction=f"{category} question {i}",
                    response="answer",
                    category=category,
                    domain=("general", "code", "medical")[i % 3],
                    id=f"{category}-{i:05d}",
                    split="test" if i < 10 else "train",
                    fedit_client=i % 5 if i >= 10 else None,
                )
            )
    return records


RECORDS = synthetic_records()
pytestmark = pytest.mark.filterwarnings("error::flexmoe.data.records.DataWarning")


def placements(partition: Partition) -> Counter[str]:
    """How many times each record id appears in any client's train or test split."""
    return Counter(r.id for c in partition.clients for split in (c.train, c.test) for r in split)


def entropy(counts: Counter[str]) -> float:
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values() if n)


@pytest.mark.parametrize(
    ("strategy", "options", "expected_unassigned"),
    [
        ("iid", {"num_clients": 4}, 0),
        ("dirichlet", {"num_clients": 5, "alpha": 0.5}, 0),
        ("natural", {}, 60),  # the 10 test-marked records per category have no FedIT client
        ("domain", {}, 0),
    ],
)
def test_every_record_is_in_exactly_one_client(strategy, options, expected_unassigned):
    with pytest.warns(DataWarning) if expected_unassigned else contextlib.nullcontext():
        partition = make_partition(RECORDS, strategy, test_per_client=40, seed=0, **options)
    seen = placements(partition)
    assert max(seen.values()) == 1  # disjoint, train vs test included
    assert len(seen) == len(RECORDS) - expected_unassigned  # complete
    assert partition.unassigned == expected_unassigned
    assert all(len(c.test) == 40 and c.train for c in partition.clients)


def test_pathological_gives_each_client_one_category_and_its_marked_test_records():
    partition = make_partition(RECORDS, "pathological", test_per_client=25, seed=0)
    assert [c.name for c in partition.clients] == list(PAPER_CATEGORIES)
    for client in partition.clients:
        assert {r.category for r in client.train + client.test} == {client.name}
        assert len(client.train) == CATEGORY_SIZES[client.name] - 25
        # the source's own test records come first: all 10, then 15 drawn from the rest
        assert sum(r.split == "test" for r in client.test) == 10
        assert not {r.id for r in client.train} & {r.id for r in client.test}
    assert partition.unassigned == 350 + 200  # open_qa and brainstorming are not used
    chosen = make_partition(RECORDS, "pathological", categories=["open_qa", "summarization"])
    assert [c.name for c in chosen.clients] == ["open_qa", "summarization"]


def test_same_seed_same_partition_different_seed_different():
    for strategy, options in [("iid", {"num_clients": 3}), ("dirichlet", {"num_clients": 4})]:
        a = make_partition(RECORDS, strategy, seed=7, test_per_client=20, **options)
        b = make_partition(list(reversed(RECORDS)), strategy, seed=7, test_per_client=20, **options)
        c = make_partition(RECORDS, strategy, seed=8, test_per_client=20, **options)
        assert a.hash == b.hash  # independent of the order records arrive in
        assert [[r.id for r in x.train] for x in a.clients] == [
            [r.id for r in x.train] for x in b.clients
        ]
        assert a.hash != c.hash


def test_dirichlet_alpha_controls_the_skew_of_each_clients_categories():
    max_entropy = math.log(len(CATEGORY_SIZES))
    balanced = make_partition(RECORDS, "dirichlet", num_clients=4, alpha=1000.0, test_per_client=20)
    skewed = make_partition(RECORDS, "dirichlet", num_clients=4, alpha=0.05, test_per_client=20)
    balanced_entropy = [entropy(c) for c in balanced.category_counts().values()]
    skewed_entropy = [entropy(c) for c in skewed.category_counts().values()]
    assert min(balanced_entropy) > 0.97 * max_entropy
    assert sum(skewed_entropy) / len(skewed_entropy) < 0.5 * max_entropy
    sizes = [len(c.train) + len(c.test) for c in balanced.clients]
    assert max(sizes) - min(sizes) < 0.05 * len(RECORDS)


def test_each_test_split_follows_its_clients_own_category_mix():
    partition = make_partition(RECORDS, "dirichlet", num_clients=3, alpha=0.3, test_per_client=50)
    for client in partition.clients:
        share = Counter(r.category for r in client.train + client.test)
        test = Counter(r.category for r in client.test)
        total = sum(share.values())
        for category, n in share.items():
            assert abs(test[category] - 50 * n / total) < 1  # largest-remainder quotas


def test_dirichlet_redraws_until_every_client_can_hold_out_its_test_split(monkeypatch):
    options = {"num_clients": 8, "alpha": 0.1, "test_per_client": 30}
    partition = make_partition(RECORDS, "dirichlet", **options)
    assert min(len(c.train) for c in partition.clients) >= 1
    # with this seed the first draw leaves a client with fewer than 31 records
    monkeypatch.setattr(partition_module, "DIRICHLET_MAX_TRIES", 0)
    with pytest.raises(DataError, match="after 1 Dirichlet draws"):
        make_partition(RECORDS, "dirichlet", **options)
    monkeypatch.undo()
    with pytest.raises(DataError, match="raise alpha"):
        make_partition(RECORDS, "dirichlet", num_clients=8, alpha=0.1, test_per_client=250)


def test_summary_table_has_a_row_per_client_and_a_column_per_category():
    partition = make_partition(RECORDS, "pathological", test_per_client=10)
    table = partition.summary_table()
    assert table.row_count == 4
    headers = [str(column.header) for column in table.columns]
    assert headers == ["client", *sorted(PAPER_CATEGORIES), "train", "test"]
    assert partition.hash[:12] in str(table.title)
    record = partition.to_dict()
    assert record["hash"] == partition.hash
    assert [c["train_categories"] for c in record["clients"]] == [
        {name: CATEGORY_SIZES[name] - 10} for name in PAPER_CATEGORIES
    ]


def test_bad_requests_fail_with_clear_errors():
    with pytest.raises(DataError, match="unknown category nope"):
        make_partition(RECORDS, "pathological", categories=["closed_qa", "nope"])
    with pytest.raises(DataError, match="5 clients need 5 categories, got 4"):
        make_partition(RECORDS, "pathological", num_clients=5, categories=PAPER_CATEGORIES)
    with pytest.raises(DataError, match="alpha must be > 0"):
        make_partition(RECORDS, "dirichlet", num_clients=3, alpha=0.0)
    with pytest.raises(DataError, match="too few to hold out test_per_client=300"):
        make_partition(RECORDS, "pathological", test_per_client=300)
    with pytest.raises(DataError, match="needs num_clients"):
        make_partition(RECORDS, "iid")
    with pytest.raises(DataError, match="unknown partition strategy 'random'"):
        make_partition(RECORDS, "random", num_clients=2)
    with pytest.raises(DataError, match="not unique"):
        make_partition([*RECORDS, RECORDS[0]], "iid", num_clients=2)
    with pytest.raises(DataError, match="has 3 clients, not 4"):
        make_partition(RECORDS, "domain", num_clients=4)
    no_domain = [InstructionRecord("q", "a", category="x", id=str(i)) for i in range(20)]
    with pytest.raises(DataError, match="no record has a `domain`"):
        make_partition(no_domain, "domain", test_per_client=1)


def test_bundled_dolly_natural_and_pathological_splits():
    dolly = load_instructions("dolly")
    with pytest.warns(DataWarning, match="80 of 14995 records have no `fedit_client`"):
        natural = make_partition(dolly, "natural", test_per_client=100)
    assert [c.name for c in natural.clients] == [f"fedit-{k}" for k in range(10)]
    assert all(1389 <= len(c.train) + len(c.test) <= 1494 for c in natural.clients)
    pathological = make_partition(dolly, "pathological", test_per_client=100)
    for client in pathological.clients:
        assert sum(r.split == "test" for r in client.test) == 10  # Dolly's own 10 per category
        assert len(client.test) == 100


def test_pathological_without_named_categories_takes_paper_tasks_then_the_largest():
    # the paper's tasks first, then the largest others
    three = make_partition(RECORDS, "pathological", num_clients=3, test_per_client=10)
    assert [c.name for c in three.clients] == list(PAPER_CATEGORIES[:3])
    five = make_partition(RECORDS, "pathological", num_clients=5, test_per_client=10)
    assert [c.name for c in five.clients] == [*PAPER_CATEGORIES, "open_qa"]
    # data without the paper's categories (e.g. an Alpaca-style file with its own labels)
    relabelled = [
        InstructionRecord(r.instruction, r.response, category=f"topic-{r.category}", id=r.id)
        for r in RECORDS
    ]
    four = make_partition(relabelled, "pathological", num_clients=4, test_per_client=10)
    assert [c.name for c in four.clients] == [
        "topic-classification", "topic-closed_qa", "topic-open_qa", "topic-information_extraction"
    ]  # fmt: skip
    assert four.unassigned == 250 + 200  # summarization and brainstorming left out


def test_pathological_with_too_few_categories_says_which_partition_to_use():
    unlabelled = [InstructionRecord(r.instruction, r.response, id=r.id) for r in RECORDS]
    with pytest.raises(
        DataError, match=r"has 0 categories \(none\) for 4 clients.*dirichlet or iid"
    ):
        make_partition(unlabelled, "pathological", num_clients=4, test_per_client=10)
    with pytest.raises(DataError, match=r"has 6 categories .* for 7 clients"):
        make_partition(RECORDS, "pathological", num_clients=7, test_per_client=10)


def test_only_bundled_data_is_held_back_from_test_items_for_a_flexmoe_model(tmp_path):
    from flexmoe.federated.config import RunConfig
    from flexmoe.federated.task import pretraining_share
    from flexmoe.models.pretrain import METADATA_FILE

    model_dir = tmp_path / "model"  # a flexmoe-pretrained model: it saw half of the bundled sets
    model_dir.mkdir()
    (model_dir / METADATA_FILE).write_text('{"data": {"instruction_share": 0.5}}')
    cfg = RunConfig(model=str(model_dir))
    assert pretraining_share(cfg) == 0.5
    cfg.data.source = str(tmp_path / "mine.jsonl")  # the user's own data: never pretrained on
    assert pretraining_share(cfg) is None

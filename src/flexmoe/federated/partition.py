"""Split instruction records among federated clients, each with a held-out test split of its own.

Strategies (seeded: the same records and seed give the same partition and `partition_hash`):
- `pathological`: client k holds every record of one category (the paper's default 4 clients:
  closed_qa, information_extraction, classification, summarization; for other data, its largest
  categories);
- `dirichlet`: per category, its records are split among the clients at proportions drawn from
  Dir(alpha); the whole draw is repeated until every client has enough records (the algorithm of
  flwr-datasets' DirichletPartitioner, without its `datasets<5` pin). Small alpha = skewed;
- `domain`: one client per `domain` value;
- `iid`: uniformly random, near-equal shares;
- `natural`: the FedIT/Shepherd 10-client Dolly split recorded in `fedit_client`.

Each client's test split is drawn from its own share, category by category in proportion to the
share (so it follows the client's own distribution), preferring records the source marks
`split == "test"` (Dolly's own 10 per category). A record is in at most one client, as train or
test, never both.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.table import Table

from flexmoe.data.records import DataError, DataWarning, InstructionRecord

PAPER_CATEGORIES = ("closed_qa", "information_extraction", "classification", "summarization")
"""The paper's pathological split: one Dolly task category per client."""
PARTITION_STRATEGIES = ("pathological", "dirichlet", "domain", "iid", "natural")
DIRICHLET_MAX_TRIES = 10
"""Redraws allowed before `dirichlet` gives up on giving every client enough records."""


@dataclass(frozen=True)
class ClientData:
    client_id: int
    name: str
    """What the client holds: its category, domain or `client-<id>`."""
    train: list[InstructionRecord]
    test: list[InstructionRecord]


@dataclass(frozen=True)
class Partition:
    strategy: str
    seed: int
    clients: list[ClientData]
    unassigned: int = 0
    """Records given to no client (categories not chosen, records without a natural client)."""
    hash: str = field(init=False)
    """sha256 over each client's sorted train and test record ids (see `partition_hash`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", partition_hash(self.clients))

    def category_counts(self) -> dict[str, Counter[str]]:
        """Training records per category, by client name."""
        return {c.name: Counter(r.category for r in c.train) for c in self.clients}

    def to_dict(self) -> dict[str, Any]:
        """What to record with a run's results: strategy, seed, hash and per-client sizes."""
        counts = self.category_counts()
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "hash": self.hash,
            "unassigned": self.unassigned,
            "clients": [
                {
                    "client_id": c.client_id,
                    "name": c.name,
                    "train": len(c.train),
                    "test": len(c.test),
                    "train_categories": dict(sorted(counts[c.name].items())),
                }
                for c in self.clients
            ],
        }

    def summary_table(self) -> Table:
        """Clients x categories (training records), plus train and test totals."""
        counts = self.category_counts()
        categories = sorted({cat for per_client in counts.values() for cat in per_client})
        table = Table(
            title=f"{self.strategy} partition, seed {self.seed}, hash {self.hash[:12]}",
            caption=f"{self.unassigned} records in no client" if self.unassigned else None,
        )
        table.add_column("client")
        for category in categories:
            table.add_column(category, justify="right")
        table.add_column("train", justify="right", style="bold")
        table.add_column("test", justify="right", style="bold")
        for client in self.clients:
            per_client = counts[client.name]
            table.add_row(
                f"{client.client_id}: {client.name}",
                *(str(per_client.get(cat, 0) or "") for cat in categories),
                str(len(client.train)),
                str(len(client.test)),
            )
        return table


def partition_hash(clients: Sequence[ClientData]) -> str:
    """sha256 over the clients' sorted train and test record ids, in client order."""
    ids = [
        {"train": sorted(r.id for r in c.train), "test": sorted(r.id for r in c.test)}
        for c in clients
    ]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def make_partition(
    records: Sequence[InstructionRecord],
    strategy: str,
    *,
    num_clients: int | None = None,
    categories: Sequence[str] | None = None,
    alpha: float = 0.5,
    test_per_client: int = 100,
    seed: int = 0,
    min_partition_size: int = 10,
    test_eligible: Callable[[InstructionRecord], bool] | None = None,
) -> Partition:
    """Partition `records` among clients with `strategy` and hold out each client's test split.

    `test_eligible` restricts which training-split records may become test items (e.g. only
    records the base model never saw in pretraining); records of a `test` split always may.

    `num_clients` is required for `iid` and `dirichlet`; the other strategies derive it (from
    `categories`, the domains, or the FedIT clients) and only check it if given. `categories`
    (pathological only) names each client's category, in client order. `min_partition_size`
    (dirichlet) is the smallest share, test items included, a redraw must reach.
    """
    if strategy not in PARTITION_STRATEGIES:
        choices = ", ".join(PARTITION_STRATEGIES)
        raise DataError(f"unknown partition strategy {strategy!r}; choose one of {choices}")
    if test_per_client < 0:
        raise DataError(f"test_per_client must be >= 0, got {test_per_client}")
    records = _sorted_by_unique_id(records)
    rng = np.random.default_rng(seed)
    if strategy == "pathological":
        shares = _pathological(records, num_clients, categories)
    elif strategy == "dirichlet":
        needed = max(min_partition_size, test_per_client + 1)
        shares = _dirichlet(records, _required(num_clients, strategy), alpha, needed, rng)
    elif strategy == "domain":
        shares = _by_key(records, num_clients, "domain", lambda r: r.domain or None)
    elif strategy == "iid":
        shares = _iid(records, _required(num_clients, strategy), rng)
    else:
        shares = _by_key(records, num_clients, "fedit_client", lambda r: r.fedit_client)
        shares = [(f"fedit-{name}", share) for name, share in shares]
    clients = []
    for client_id, (name, share) in enumerate(shares):
        if len(share) <= test_per_client:
            raise DataError(
                f"client {client_id} ({name}) has {len(share)} records, too few to hold out "
                f"test_per_client={test_per_client} and still train: lower --set data.test_per_client=N"
                + (" or num_clients, or raise alpha" if strategy == "dirichlet" else "")
            )
        train, test = _hold_out(share, test_per_client, rng, test_eligible)
        clients.append(ClientData(client_id, name, train, test))
    assigned = sum(len(c.train) + len(c.test) for c in clients)
    return Partition(strategy, seed, clients, unassigned=len(records) - assigned)


def _required(num_clients: int | None, strategy: str) -> int:
    if num_clients is None or num_clients < 1:
        raise DataError(f"the {strategy} partition needs num_clients >= 1, got {num_clients}")
    return num_clients


def _sorted_by_unique_id(records: Sequence[InstructionRecord]) -> list[InstructionRecord]:
    """Records in id order, so the partition does not depend on the order they were loaded in."""
    if not records:
        raise DataError("no records to partition")
    counts = Counter(r.id for r in records)
    duplicated = sorted(i for i, n in counts.items() if n > 1)
    if duplicated:
        raise DataError(
            f"{len(duplicated)} record ids are not unique (e.g. {duplicated[:3]}); a partition is "
            "recorded by record ids, so give every record a distinct `id`"
        )
    return sorted(records, key=lambda r: r.id)


def _pathological(
    records: list[InstructionRecord],
    num_clients: int | None,
    categories: Sequence[str] | None,
) -> list[tuple[str, list[InstructionRecord]]]:
    by_category = _group(records, lambda r: r.category or None)
    by_category.pop(None, None)
    categories = list(categories or default_categories(by_category, num_clients))
    unknown = [c for c in categories if c not in by_category]
    if unknown:
        raise DataError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"the records have: {', '.join(sorted(by_category))}"
        )
    if len(set(categories)) != len(categories):
        raise DataError(f"each category can go to one client only; got {categories}")
    if num_clients is not None and num_clients > len(categories):
        raise DataError(
            f"the pathological partition gives each client one category: {num_clients} clients "
            f"need {num_clients} categories, got {len(categories)} ({', '.join(categories)}); "
            "name more categories or ask for fewer clients"
        )
    if num_clients is not None and num_clients < len(categories):
        raise DataError(
            f"{num_clients} clients but {len(categories)} categories: the pathological partition "
            "gives one client per category, so name exactly the categories to use"
        )
    return [(category, by_category[category]) for category in categories]


def default_categories(
    by_category: dict[str, list[InstructionRecord]], num_clients: int | None
) -> list[str]:
    """`num_clients` categories (default 4): the paper's four Dolly tasks first when the data has
    them, then the largest other categories (ties by name), so any labelled file works."""
    wanted = num_clients or len(PAPER_CATEGORIES)
    largest = sorted(by_category, key=lambda c: (-len(by_category[c]), c))
    if all(c in by_category for c in PAPER_CATEGORIES):
        largest = [*PAPER_CATEGORIES, *(c for c in largest if c not in PAPER_CATEGORIES)]
    if len(largest) < wanted:
        found = ", ".join(largest) or "none"
        raise DataError(
            f"the pathological partition gives each client one category, but the data has "
            f"{len(largest)} categor{'y' if len(largest) == 1 else 'ies'} ({found}) for "
            f"{wanted} clients: ask for fewer clients, or use --partition dirichlet or iid "
            "with --clients N"
        )
    return largest[:wanted]


def _dirichlet(
    records: list[InstructionRecord],
    num_clients: int,
    alpha: float,
    needed: int,
    rng: np.random.Generator,
) -> list[tuple[str, list[InstructionRecord]]]:
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0 (smaller = more skewed), got {alpha}")
    by_category = _group(records, lambda r: r.category)
    for _ in range(DIRICHLET_MAX_TRIES + 1):
        shares: list[list[InstructionRecord]] = [[] for _ in range(num_clients)]
        for category in sorted(by_category):
            members = by_category[category]
            order = rng.permutation(len(members))
            proportions = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
            for share, part in zip(shares, np.split(order, cuts), strict=True):
                share.extend(members[i] for i in part)
        if min(len(share) for share in shares) >= needed:
            return [(f"client-{k}", sorted(s, key=lambda r: r.id)) for k, s in enumerate(shares)]
    raise DataError(
        f"after {DIRICHLET_MAX_TRIES + 1} Dirichlet draws (alpha={alpha}) some of the "
        f"{num_clients} clients still had fewer than {needed} of the {len(records)} records; "
        "raise alpha, or lower num_clients or test_per_client"
    )


def _iid(
    records: list[InstructionRecord], num_clients: int, rng: np.random.Generator
) -> list[tuple[str, list[InstructionRecord]]]:
    order = rng.permutation(len(records))
    return [
        (f"client-{k}", sorted((records[i] for i in part), key=lambda r: r.id))
        for k, part in enumerate(np.array_split(order, num_clients))
    ]


def _by_key(
    records: list[InstructionRecord],
    num_clients: int | None,
    field_name: str,
    key: Callable[[InstructionRecord], object],
) -> list[tuple[str, list[InstructionRecord]]]:
    """One client per distinct value of `key` (records where it is None go to no client)."""
    groups = _group(records, key)
    missing = groups.pop(None, [])
    if not groups:
        raise DataError(
            f"no record has a `{field_name}`, so there is nothing to partition by "
            + (
                "(the bundled 'instruct' set has domains)"
                if field_name == "domain"
                else "(the bundled 'dolly' set has FedIT clients)"
            )
        )
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(records)} records have no `{field_name}` and go to no client",
            DataWarning,
            stacklevel=3,
        )
    if num_clients is not None and num_clients != len(groups):
        raise DataError(
            f"the records have {len(groups)} distinct `{field_name}` values, so this partition "
            f"has {len(groups)} clients, not {num_clients}"
        )
    return [(str(value), groups[value]) for value in sorted(groups)]


def _group(
    records: list[InstructionRecord], key: Callable[[InstructionRecord], object]
) -> dict[object, list[InstructionRecord]]:
    groups: dict[object, list[InstructionRecord]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return dict(groups)


def _hold_out(
    share: list[InstructionRecord],
    num_test: int,
    rng: np.random.Generator,
    eligible: Callable[[InstructionRecord], bool] | None = None,
) -> tuple[list[InstructionRecord], list[InstructionRecord]]:
    """Split a client's share into (train, test) with test following the share's category mix."""
    by_category = _group(share, lambda r: r.category)
    names = sorted(by_category)
    exact = [num_test * len(by_category[c]) / len(share) for c in names]
    quotas = [math.floor(q) for q in exact]
    by_remainder = sorted(range(len(names)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: num_test - sum(quotas)]:  # largest remainders get the leftovers
        quotas[i] += 1
    test: list[InstructionRecord] = []
    for category, quota in zip(names, quotas, strict=True):
        members = by_category[category]
        marked = [r for r in members if r.split == "test"]
        others = [r for r in members if r.split != "test" and (eligible is None or eligible(r))]
        candidates = [marked[i] for i in rng.permutation(len(marked))]
        candidates += [others[i] for i in rng.permutation(len(others))]
        if len(candidates) < quota:
            raise DataError(
                f"category {category!r} has {len(candidates)} records eligible as test items, "
                f"{quota} needed: lower data.test_per_client"
            )
        test.extend(candidates[:quota])
    test_ids = {r.id for r in test}
    train = [r for r in share if r.id not in test_ids]
    return train, sorted(test, key=lambda r: r.id)

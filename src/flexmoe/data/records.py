"""The one record type every instruction dataset is turned into, and the data layer's errors.

Whatever the source (bundled Dolly, an Alpaca-style file, a Hub dataset), the rest of flexmoe only
ever sees `InstructionRecord`s, so partitioning, prompting and evaluation never care where the data
came from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstructionRecord:
    """One instruction-tuning example, in Dolly's field names.

    Alpaca-style data maps input -> `context` and output -> `response`. `category` and `domain`
    are the natural client keys for non-IID partitions; `split` is the record's own train/test
    assignment (Dolly ships a 10-per-category test split); `fedit_client` is the client index of
    the FedIT/Shepherd 10-client Dolly partition (None elsewhere).
    """

    instruction: str
    response: str
    context: str = ""
    category: str = ""
    domain: str = ""
    id: str = ""
    split: str = "train"
    fedit_client: int | None = None


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the problem and how to fix it."""


class DataWarning(UserWarning):
    """Data was usable but some of it was dropped; the message gives the count and the reason."""

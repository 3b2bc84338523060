"""Data layer: bundled data (checksummed), instruction loaders, prompts and tokens, MMLU, corpus."""

from flexmoe.data.bundled import bundled_files, read_bundled_bytes, read_bundled_text
from flexmoe.data.corpus import CORPUS_PARTS, corpus_documents
from flexmoe.data.loaders import (
    BUNDLED_INSTRUCTION_SETS,
    BundledSet,
    bundled_instruction_sets,
    load_instructions,
)
from flexmoe.data.mmlu import MMLU_SPLITS, MMLUItem, load_mmlu, mmlu_categories
from flexmoe.data.prompting import (
    IGNORE_INDEX,
    PROMPT_NO_CONTEXT,
    PROMPT_WITH_CONTEXT,
    EncodedExample,
    build_prompt,
    collate,
    encode_dataset,
    encode_example,
    encode_prompt,
)
from flexmoe.data.records import DataError, DataWarning, InstructionRecord
from flexmoe.data.summary import data_table, summarize

__all__ = [
    "BUNDLED_INSTRUCTION_SETS",
    "CORPUS_PARTS",
    "IGNORE_INDEX",
    "MMLU_SPLITS",
    "PROMPT_NO_CONTEXT",
    "PROMPT_WITH_CONTEXT",
    "BundledSet",
    "DataError",
    "DataWarning",
    "EncodedExample",
    "InstructionRecord",
    "MMLUItem",
    "build_prompt",
    "bundled_files",
    "bundled_instruction_sets",
    "collate",
    "corpus_documents",
    "data_table",
    "encode_dataset",
    "encode_example",
    "encode_prompt",
    "load_instructions",
    "load_mmlu",
    "mmlu_categories",
    "read_bundled_bytes",
    "read_bundled_text",
    "summarize",
]

"""Alpaca prompts and tokenization: exact template, exact label masking, the truncation rule.

Uses a real tokenizer: a tiny byte-level BPE trained here (offline) on a few sentences and wrapped
in transformers' PreTrainedTokenizerFast, like a Hub tokenizer would be.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from flexmoe.data import (
    IGNORE_INDEX,
    DataError,
    DataWarning,
    InstructionRecord,
    build_prompt,
    collate,
    encode_dataset,
    encode_example,
    encode_prompt,
)

SENTENCES = [
    "Below is an instruction that describes a task. Write a response.",
    "### Instruction: ### Input: ### Response:",
    "The quick brown fox jumps over the lazy dog.",
    "Federated learning trains a shared model on data that stays with its clients.",
    "A mixture of experts routes every token to a few of its expert networks.",
]


def make_tokenizer(*, adds_bos: bool) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(SENTENCES, trainer)
    if adds_bos:  # Llama-style: the tokenizer itself puts BOS in front of every text
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(adds_bos=False)


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def words(n, start=0):
    return " ".join(f"w{i}" for i in range(start, start + n))


QA = InstructionRecord(instruction="What does a router do?", response="It picks experts.")
WITH_CONTEXT = InstructionRecord(
    instruction="Summarize the text.",
    context="Mixture-of-experts models send each token to a few experts.",
    response="Tokens go to few experts.",
)


# --- template ------------------------------------------------------------------------------------


def test_prompt_template_with_context_is_the_papers():
    assert build_prompt(WITH_CONTEXT) == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarize the text.\n\n"
        "### Input:\nMixture-of-experts models send each token to a few experts.\n\n"
        "### Response:\n"
    )


def test_prompt_template_without_context_is_the_papers():
    assert build_prompt(QA) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat does a router do?\n\n### Response:\n"
    )


def test_braces_in_the_text_are_kept_literally():
    record = InstructionRecord(instruction="Format {name}", response="ok", context="{0} {}")
    assert "### Instruction:\nFormat {name}\n\n### Input:\n{0} {}\n\n" in build_prompt(record)


# --- label masking -------------------------------------------------------------------------------


@pytest.mark.parametrize("record", [QA, WITH_CONTEXT], ids=["no-context", "context"])
def test_labels_mask_exactly_the_prompt(tokenizer, record):
    example = encode_example(record, tokenizer, max_length=512)
    prompt_ids = ids(tokenizer, build_prompt(record))
    response_ids = ids(tokenizer, record.response)
    eos = tokenizer.eos_token_id
    assert example.input_ids == prompt_ids + response_ids + [eos]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos]
    labelled = [t for t in example.labels if t != IGNORE_INDEX]
    assert labelled[-1] == eos
    assert tokenizer.decode(labelled[:-1]) == record.response
    assert tokenizer.decode(example.input_ids[: len(prompt_ids)]) == build_prompt(record)


def test_a_tokenizer_that_adds_bos_gets_it_in_front_and_masked():
    tokenizer = make_tokenizer(adds_bos=True)
    bos = tokenizer.bos_token_id
    assert tokenizer.encode("a")[0] == bos  # the premise: this tokenizer adds BOS itself
    example = encode_example(QA, tokenizer, max_length=512)
    prompt_ids = ids(tokenizer, build_prompt(QA))
    assert example.input_ids[0] == bos and example.input_ids.count(bos) == 1
    assert example.input_ids[1 : 1 + len(prompt_ids)] == prompt_ids
    assert example.labels[: 1 + len(prompt_ids)] == [IGNORE_INDEX] * (1 + len(prompt_ids))
    assert encode_prompt(QA, tokenizer, 512) == [bos, *prompt_ids]


def test_no_bos_when_the_tokenizer_would_not_add_one(tokenizer):
    assert tokenizer.bos_token_id is not None  # it has one, but encode() does not add it
    assert encode_prompt(QA, tokenizer, 512) == ids(tokenizer, build_prompt(QA))


# --- truncation ----------------------------------------------------------------------------------


def split_example(example):
    """(prompt ids, labelled ids) of an example whose labels mask a prefix."""
    n_prompt = sum(1 for t in example.labels if t == IGNORE_INDEX)
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    return example.input_ids[:n_prompt], example.input_ids[n_prompt:]


def test_the_context_is_cut_first_and_keeps_its_head(tokenizer):
    record = InstructionRecord(instruction="Repeat.", context=words(300), response="w0 w1 w2")
    max_length = 200
    example = encode_example(record, tokenizer, max_length)
    prompt, labelled = split_example(example)
    assert labelled == [*ids(tokenizer, record.response), tokenizer.eos_token_id]
    assert len(example.input_ids) <= max_length
    text = tokenizer.decode(prompt)
    assert text.startswith(build_prompt(record).split("### Input:\n")[0] + "### Input:\n")
    assert text.endswith("\n\n### Response:\n")
    head = text.split("### Input:\n")[1].removesuffix("\n\n### Response:\n")
    assert head and record.context.startswith(head) and len(head) < len(record.context)
    # The longest head: one more context token would not fit.
    longer = tokenizer.decode(ids(tokenizer, record.context)[: len(ids(tokenizer, head)) + 1])
    longer_prompt = ids(tokenizer, build_prompt(InstructionRecord("Repeat.", "", longer)))
    assert len(longer_prompt) + len(labelled) > max_length


def test_the_context_is_dropped_when_no_context_token_fits(tokenizer):
    bare = InstructionRecord(instruction="Repeat.", response=words(60))
    room = len(ids(tokenizer, build_prompt(bare))) + len(ids(tokenizer, bare.response)) + 1
    record = InstructionRecord(instruction="Repeat.", context=words(50), response=words(60))
    example = encode_example(record, tokenizer, max_length=room)
    prompt, labelled = split_example(example)
    assert tokenizer.decode(prompt) == build_prompt(bare)  # the instruction-only template
    assert labelled[-1] == tokenizer.eos_token_id and len(example.input_ids) == room


def test_a_response_too_long_for_any_context_is_cut_to_half(tokenizer):
    record = InstructionRecord(instruction="Continue.", context=words(300), response=words(300))
    max_length = 256
    example = encode_example(record, tokenizer, max_length)
    prompt, labelled = split_example(example)
    assert len(example.input_ids) == max_length
    assert len(labelled) >= max_length // 2 and len(prompt) <= max_length - max_length // 2
    assert labelled == ids(tokenizer, record.response)[: len(labelled)]  # head kept, no EOS
    assert tokenizer.eos_token_id not in labelled
    assert "### Input:\nw0 w1" in tokenizer.decode(prompt)  # some context still there


def test_a_long_instruction_leaves_less_than_half_but_at_least_a_quarter(tokenizer):
    record = InstructionRecord(instruction=words(25), context=words(50), response=words(300))
    max_length = 256
    instruction_only = ids(tokenizer, build_prompt(InstructionRecord(words(25), "x")))
    assert max_length // 2 < len(instruction_only) <= max_length - max_length // 4  # the premise
    example = encode_example(record, tokenizer, max_length)
    prompt, labelled = split_example(example)
    assert prompt == instruction_only
    assert len(labelled) == max_length - len(instruction_only)


def test_skipped_when_the_instruction_leaves_less_than_a_quarter(tokenizer):
    long_instruction = InstructionRecord(instruction=words(40), response=words(300))
    max_length = 256
    assert len(ids(tokenizer, build_prompt(long_instruction))) > max_length - max_length // 4
    assert encode_example(long_instruction, tokenizer, max_length) is None
    # ...but kept whole when its short response fits, however long the instruction.
    short = InstructionRecord(instruction=words(40), response="w1")
    labelled = split_example(encode_example(short, tokenizer, max_length))[1]
    assert labelled == [*ids(tokenizer, "w1"), tokenizer.eos_token_id]


def test_encode_dataset_warns_once_with_the_skipped_count(tokenizer):
    skipped = InstructionRecord(instruction=words(40), response=words(300))
    records = [QA, skipped, WITH_CONTEXT, skipped]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = encode_dataset(records, tokenizer, max_length=256)
    assert examples == [
        encode_example(QA, tokenizer, 256),
        encode_example(WITH_CONTEXT, tokenizer, 256),
    ]
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 1 and messages[0].startswith("skipped 2 of 4 examples")


@pytest.mark.parametrize("max_length", range(120, 126))  # cuts land inside and between characters
def test_a_cut_inside_a_multibyte_character_leaves_no_replacement_char(tokenizer, max_length):
    record = InstructionRecord(instruction="Translate.", context="é ü ß 漢字 " * 80, response="ok")
    example = encode_example(record, tokenizer, max_length)
    text = tokenizer.decode(example.input_ids)
    assert "\ufffd" not in text and len(example.input_ids) <= max_length
    assert example.labels[-1] == tokenizer.eos_token_id


def test_every_dolly_like_length_mix_respects_max_length(tokenizer):
    lengths = [(5, 0, 5), (5, 400, 20), (5, 20, 400), (60, 400, 400), (5, 0, 400), (80, 0, 5)]
    for n_instruction, n_context, n_response in lengths:
        record = InstructionRecord(
            instruction=words(n_instruction), context=words(n_context), response=words(n_response)
        )
        example = encode_example(record, tokenizer, max_length=512)
        assert example is not None and len(example.input_ids) <= 512
        assert len(example.labels) == len(example.input_ids)


# --- prompts for generation ----------------------------------------------------------------------


def test_encode_prompt_cuts_context_then_instruction(tokenizer):
    record = InstructionRecord(instruction=words(10), context=words(100), response="unused")
    assert encode_prompt(record, tokenizer, 10_000) == ids(tokenizer, build_prompt(record))
    prompt = encode_prompt(record, tokenizer, 300)
    text = tokenizer.decode(prompt)
    assert len(prompt) <= 300 and "### Input:" in text and text.endswith("### Response:\n")
    prompt = encode_prompt(record, tokenizer, 60)
    text = tokenizer.decode(prompt)
    assert len(prompt) <= 60 and "### Input:" not in text and text.endswith("### Response:\n")
    assert "### Instruction:\nw0 w1" in text
    bare_template = len(ids(tokenizer, build_prompt(InstructionRecord("", "x"))))
    with pytest.raises(DataError, match=rf"max_prompt_length={bare_template} leaves no room"):
        encode_prompt(record, tokenizer, bare_template)  # room for the template, none for words
    # One token of a 3-byte character is no instruction either (it decodes to nothing).
    with pytest.raises(DataError, match=r"leaves no room for the instruction"):
        encode_prompt(InstructionRecord("漢字漢字", "x"), tokenizer, bare_template + 1)


# --- batching and bad arguments ------------------------------------------------------------------


def test_collate_pads_right_and_masks_padding(tokenizer):
    examples = [encode_example(QA, tokenizer, 512), encode_example(WITH_CONTEXT, tokenizer, 512)]
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    short, long = sorted(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, long)
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(e.input_ids) for e in examples]
    row = [len(e.input_ids) for e in examples].index(short)
    assert batch["input_ids"][row, short:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][row, short:].eq(IGNORE_INDEX).all()
    assert batch["labels"][row, :short].tolist() == examples[row].labels


def test_bad_arguments_are_explained(tokenizer):
    with pytest.raises(DataError, match=r"empty batch"):
        collate([], pad_token_id=0)
    with pytest.raises(DataError, match=r"pad_token_id is None"):
        collate([encode_example(QA, tokenizer, 64)], pad_token_id=None)
    with pytest.raises(DataError, match=r"max_length must be a positive"):
        encode_example(QA, tokenizer, 0)
    no_eos = make_tokenizer(adds_bos=False)
    no_eos.eos_token = None
    with pytest.raises(DataError, match=r"the tokenizer has no eos_token"):
        encode_example(QA, no_eos, 64)

"""MMLU: the standard prompt, letter scoring, truncation, batching, and accuracies that stub models
with known answers must reproduce exactly."""

from types import SimpleNamespace

import pytest
import torch
from tiny_models import build_tiny
from torch import nn

from flexmoe.data import MMLUItem, load_mmlu
from flexmoe.evaluation.mmlu import (
    MMLUError,
    answer_token_ids,
    balanced_subset,
    choice_log_likelihoods,
    encode_mmlu_prompt,
    evaluate_mmlu,
    mmlu_prompt,
    score_mmlu,
)
from flexmoe.models.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

ONE_PER_CATEGORY = ["astronomy", "philosophy", "sociology", "nutrition"]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE with merges, trained on MMLU dev text (" A" .. " D" become tokens)."""
    texts = [mmlu_prompt(item, []) + " A B C D" for item in load_mmlu("dev")]
    return train_tokenizer(texts, 600)


def item(subject, question, answer, category="STEM"):
    choices = tuple(f"{question} option {i}" for i in range(4))
    return MMLUItem(f"{subject}-{question}", subject, question, choices, answer, category)


class FixedLogits(nn.Module):
    """A "model" whose next-token logits always favour the given token ids, most to least."""

    def __init__(self, vocab_size, favoured):
        super().__init__()
        self.logits = torch.zeros(vocab_size)
        for rank, token in enumerate(favoured):
            self.logits[token] = 10.0 - rank
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], 1, -1))


class Oracle(nn.Module):
    """Reads the question at the end of each prompt and puts its logit mass on the right letter."""

    def __init__(self, tokenizer, items, k_shot):
        super().__init__()
        self.tokenizer, self.k_shot = tokenizer, k_shot
        self.letter_ids = answer_token_ids(tokenizer)[1]
        self.answers = {
            f"{i.question}\nA. {i.choices[0]}\nB. {i.choices[1]}\nC. {i.choices[2]}\n"
            f"D. {i.choices[3]}\nAnswer:": i.answer
            for i in items
        }
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tokenizer))
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row][attention_mask[row].bool()])
            assert text.startswith("The following are multiple choice questions (with answers)")
            assert text.count("\nAnswer: ") == self.k_shot  # the shots, each with its answer
            (answer,) = [a for block, a in self.answers.items() if text.endswith(block)]
            logits[row, 0, self.letter_ids[answer]] = 1.0
        return SimpleNamespace(logits=logits)


def test_the_prompt_is_the_standard_one():
    shot = MMLUItem("s", "high_school_physics", "What is 1+1?", ("1", "2", "3", "4"), 1, "STEM")
    question = MMLUItem("q", "high_school_physics", "Why?", ("a", "b", "c", "d"), 0, "STEM")
    assert mmlu_prompt(question, [shot]) == (
        "The following are multiple choice questions (with answers) about high school physics."
        "\n\nWhat is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Why?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )


def test_letters_are_single_next_tokens_with_or_without_space_merges(tokenizer):
    prefix, letters = answer_token_ids(tokenizer)
    assert prefix == [] and [tokenizer.decode([t]) for t in letters] == [" A", " B", " C", " D"]
    bytes_only = train_tokenizer(["Answer: A B C D"], MIN_VOCAB_SIZE)  # no merges: " A" = 2 tokens
    prefix, letters = answer_token_ids(bytes_only)
    assert [bytes_only.decode(prefix)] == [" "]
    assert [bytes_only.decode([t]) for t in letters] == ["A", "B", "C", "D"]


def test_scoring_picks_the_favoured_letter_and_hand_computed_accuracy(tokenizer):
    letters = answer_token_ids(tokenizer)[1]
    # always "C" first, then "A": only C (index 2) is ever predicted
    model = FixedLogits(len(tokenizer), [letters[2], letters[0]])
    items = [
        item("astronomy", "q1", 2),
        item("astronomy", "q2", 2),
        item("astronomy", "q3", 0),
        item("philosophy", "q4", 1, "humanities"),
        item("philosophy", "q5", 2, "humanities"),
    ]
    shots = [item("astronomy", "s1", 3), item("philosophy", "s2", 0, "humanities")]
    result = score_mmlu(model, tokenizer, items, shots, k_shot=1, batch_size=2, progress=False)
    assert result.n == 5
    assert result.accuracy == pytest.approx(60.0)  # 3 of 5
    assert result.per_subject == {"astronomy": pytest.approx(200 / 3), "philosophy": 50.0}
    assert result.macro_accuracy == pytest.approx((200 / 3 + 50) / 2)
    assert result.per_category == {"STEM": pytest.approx(200 / 3), "humanities": 50.0}
    assert result.shots_dropped == 0 and result.to_dict()["k_shot"] == 1


def test_a_model_that_knows_every_answer_scores_100(tokenizer):
    items = load_mmlu("test", ONE_PER_CATEGORY)
    result = evaluate_mmlu(
        Oracle(tokenizer, items, k_shot=5),
        tokenizer,
        subjects=ONE_PER_CATEGORY,
        per_subject=2,
        batch_size=3,
        max_length=4096,  # this small tokenizer needs ~1000 tokens for 5 shots
        progress=False,
    )
    assert result.accuracy == 100.0 and result.n == 8 and len(result.per_category) == 4
    redux = load_mmlu("redux", ONE_PER_CATEGORY[:2], redux_clean_only=True)
    result = evaluate_mmlu(
        Oracle(tokenizer, redux, k_shot=2),
        tokenizer,
        split="redux",
        k_shot=2,
        subjects=ONE_PER_CATEGORY[:2],
        per_subject=3,
        redux_clean_only=True,
        max_length=4096,
        progress=False,
    )
    assert result.accuracy == 100.0 and result.n == 6 and result.split == "redux"


def test_the_subset_is_balanced_seeded_and_in_file_order():
    items = load_mmlu("test", ONE_PER_CATEGORY)
    subset = balanced_subset(items, 3, seed=0)
    assert [i.subject for i in subset] == [s for s in sorted(ONE_PER_CATEGORY) for _ in range(3)]
    assert subset == balanced_subset(items, 3, seed=0) != balanced_subset(items, 3, seed=1)
    positions = [items.index(i) for i in subset]
    assert positions == sorted(positions)


def test_long_prompts_drop_the_earliest_shots_first(tokenizer):
    shots = [item("astronomy", f"shot {i} " + "long words " * 20, i % 4) for i in range(5)]
    question = item("astronomy", "the question", 1)
    two_shots = tokenizer.encode(mmlu_prompt(question, shots[3:]))
    encoded = encode_mmlu_prompt(question, shots, tokenizer, max_length=len(two_shots))
    assert encoded.shots_used == 2 and not encoded.cut and encoded.ids == two_shots
    cut = encode_mmlu_prompt(question, shots, tokenizer, max_length=5)
    assert cut.cut and cut.shots_used == 0 and len(cut.ids) == 5
    assert cut.ids == tokenizer.encode(mmlu_prompt(question, []))[-5:]  # ends with "Answer:"


def test_batched_left_padded_scoring_equals_one_prompt_at_a_time(tokenizer):
    model = build_tiny("qwen3_moe", seed=0, vocab_size=len(tokenizer))
    items = load_mmlu("dev", ["astronomy"])
    prompts = [tokenizer.encode(mmlu_prompt(i, [])) for i in items]
    letters = answer_token_ids(tokenizer)[1]
    batched = choice_log_likelihoods(model, prompts, letters, batch_size=4, progress=False)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
            alone = torch.log_softmax(logits, -1)[letters]
            assert torch.allclose(batched[row], alone, atol=1e-4)
    assert len({len(p) for p in prompts}) > 1  # the premise: the batch really was padded


def test_bad_requests_are_refused(tokenizer):
    model = FixedLogits(len(tokenizer), [0])
    with pytest.raises(MMLUError, match="lower k_shot"):
        score_mmlu(model, tokenizer, [item("astronomy", "q", 0)], [], k_shot=1, progress=False)
    with pytest.raises(MMLUError, match="few-shot"):
        evaluate_mmlu(model, tokenizer, split="dev", progress=False)

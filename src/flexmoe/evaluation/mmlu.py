"""MMLU accuracy: k-shot prompts in the standard (Hendrycks) format, scored by the answer letter.

FLEx claims that keeping routed experts frozen preserves the base model's knowledge; MMLU after
federated fine-tuning measures that. The prompt is the original one:

    The following are multiple choice questions (with answers) about {subject}.

    {dev question 1}
    A. {choice}
    ...
    D. {choice}
    Answer: {letter}

    ... (k dev examples of the same subject, in file order) ...
    {test question}
    A. {choice}
    ...
    Answer:

The prediction is the letter whose token (" A" .. " D") is most likely as the next token (ties:
the earlier letter): one forward pass per question, no generation. A prompt longer than
`max_length` tokens (capped at the model's maximum positions) loses its earliest shots first
(fewer shots, counted in the result); only a question too long even with no shots is cut from
the left, keeping its end and "Answer:".

Accuracies are percentages: overall over all items (micro), macro over subjects, and per subject
and per MMLU category (items pooled within the category).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from rich.progress import track
from transformers import PreTrainedTokenizerBase

from flexmoe.data import MMLUItem, load_mmlu
from flexmoe.runtime import console

LETTERS = "ABCD"
SHOT_SPLIT = "dev"
"""Few-shot examples come from MMLU's dev split (5 per subject), for every evaluated split."""


class MMLUError(ValueError):
    """An MMLU evaluation that cannot run as asked; the message says what to change."""


@dataclass
class MMLUResult:
    """Accuracies in percent; `per_category` pools the items of each MMLU category."""

    accuracy: float
    """Micro: correct items / all items."""
    macro_accuracy: float
    """Mean of the per-subject accuracies."""
    per_subject: dict[str, float]
    per_category: dict[str, float]
    n: int
    split: str
    k_shot: int
    shots_dropped: int
    """Shots removed in total to fit prompts into `max_length` (0: every prompt had k shots)."""
    questions_cut: int
    """Questions too long even without shots, cut from the left."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    shots_used: int
    cut: bool


def evaluate_mmlu(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "test",
    k_shot: int = 5,
    per_subject: int | None = None,
    subjects: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 1024,
    redux_clean_only: bool = False,
    progress: bool = True,
) -> MMLUResult:
    """Accuracy of `model` on MMLU `split` ("test", or "redux" for MMLU-Redux).

    `per_subject` evaluates a subject-balanced subset: that many items per subject, drawn with
    `seed` (all items of a subject that has fewer). `redux_clean_only` keeps the MMLU-Redux
    questions its annotators found sound.
    """
    if split == SHOT_SPLIT:
        raise MMLUError(
            f"split {SHOT_SPLIT!r} holds the few-shot examples; evaluate 'test' or 'redux'"
        )
    items = load_mmlu(split, subjects, redux_clean_only=redux_clean_only)
    if per_subject is not None:
        items = balanced_subset(items, per_subject, seed)
    shots = load_mmlu(SHOT_SPLIT, subjects) if k_shot > 0 else []
    return score_mmlu(
        model,
        tokenizer,
        items,
        shots,
        k_shot=k_shot,
        batch_size=batch_size,
        max_length=max_length,
        split=split,
        progress=progress,
    )


def balanced_subset(items: Sequence[MMLUItem], per_subject: int, seed: int) -> list[MMLUItem]:
    """`per_subject` items of every subject, drawn with `seed`, kept in their original order."""
    if per_subject < 1:
        raise MMLUError(f"per_subject must be >= 1 (or None for all items), got {per_subject}")
    by_subject: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        by_subject[item.subject].append(position)
    rng = random.Random(seed)
    chosen, short = [], []
    for subject in sorted(by_subject):
        positions = by_subject[subject]
        if len(positions) < per_subject:
            short.append(f"{subject} ({len(positions)})")
        chosen += rng.sample(positions, min(per_subject, len(positions)))
    if short:
        console.print(
            f"[yellow]warning:[/] {len(short)} subject(s) have fewer than {per_subject} items, "
            f"all of them are used: {', '.join(short)}"
        )
    return [items[position] for position in sorted(chosen)]


def score_mmlu(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[MMLUItem],
    shot_items: Sequence[MMLUItem],
    *,
    k_shot: int = 5,
    batch_size: int = 8,
    max_length: int = 1024,
    split: str = "test",
    progress: bool = True,
) -> MMLUResult:
    """Predict every item's letter with `k_shot` examples of its subject from `shot_items`.

    `max_length` is capped at the model's `max_position_embeddings` when the config has one.
    """
    if not items:
        raise MMLUError("no MMLU items to evaluate")
    if k_shot < 0 or batch_size < 1 or max_length < 2:
        raise MMLUError(
            f"need k_shot >= 0, batch_size >= 1 and max_length >= 2; got {k_shot}, "
            f"{batch_size}, {max_length}"
        )
    trained_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if trained_length:  # longer prompts than the model was built for are not meaningful
        max_length = min(max_length, trained_length)
    shots_by_subject: dict[str, list[MMLUItem]] = defaultdict(list)
    for shot in shot_items:
        shots_by_subject[shot.subject].append(shot)
    lacking = sorted({i.subject for i in items if len(shots_by_subject[i.subject]) < k_shot})
    if lacking:
        raise MMLUError(
            f"{k_shot}-shot prompts need {k_shot} examples per subject; too few for "
            f"{', '.join(lacking)} (MMLU's dev split has 5 per subject): lower k_shot"
        )
    n_choices = max(len(item.choices) for item in items)
    if n_choices > len(LETTERS):
        raise MMLUError(f"an item has {n_choices} choices; MMLU prompts letter at most 4")
    answer_prefix, letter_ids = answer_token_ids(tokenizer, n_choices)
    encoded = [
        encode_mmlu_prompt(
            item, shots_by_subject[item.subject][:k_shot], tokenizer, max_length, answer_prefix
        )
        for item in items
    ]
    log_likelihoods = choice_log_likelihoods(
        model, [e.ids for e in encoded], letter_ids, batch_size=batch_size, progress=progress
    )
    predictions = [
        int(torch.argmax(row[: len(item.choices)]))
        for row, item in zip(log_likelihoods, items, strict=True)
    ]
    shots_dropped = sum(k_shot - e.shots_used for e in encoded)
    questions_cut = sum(e.cut for e in encoded)
    if shots_dropped or questions_cut:
        shortened = sum(e.shots_used < k_shot or e.cut for e in encoded)
        console.print(
            f"[yellow]warning:[/] {shortened} of {len(items)} MMLU prompts exceeded "
            f"max_length={max_length} tokens: {shots_dropped} shot(s) dropped (fewest shots "
            f"used: {min(e.shots_used for e in encoded)}), {questions_cut} question(s) cut"
        )
    return summarize(
        items,
        predictions,
        split=split,
        k_shot=k_shot,
        shots_dropped=shots_dropped,
        questions_cut=questions_cut,
    )


def summarize(
    items: Sequence[MMLUItem],
    predictions: Sequence[int],
    *,
    split: str = "test",
    k_shot: int = 5,
    shots_dropped: int = 0,
    questions_cut: int = 0,
) -> MMLUResult:
    """Accuracies (micro, macro over subjects, per subject, per category) of predicted indices."""
    by_subject: dict[str, list[bool]] = defaultdict(list)
    by_category: dict[str, list[bool]] = defaultdict(list)
    for item, prediction in zip(items, predictions, strict=True):
        correct = prediction == item.answer
        by_subject[item.subject].append(correct)
        by_category[item.category].append(correct)
    per_subject = {s: _percent(v) for s, v in sorted(by_subject.items())}
    return MMLUResult(
        accuracy=_percent([p == i.answer for i, p in zip(items, predictions, strict=True)]),
        macro_accuracy=sum(per_subject.values()) / len(per_subject),
        per_subject=per_subject,
        per_category={c: _percent(v) for c, v in sorted(by_category.items())},
        n=len(items),
        split=split,
        k_shot=k_shot,
        shots_dropped=shots_dropped,
        questions_cut=questions_cut,
    )


def mmlu_prompt(item: MMLUItem, shots: Sequence[MMLUItem]) -> str:
    """The standard k-shot prompt for `item`, ending in "Answer:" (see the module docstring)."""
    subject = item.subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    solved = "".join(f"{_example(shot)} {LETTERS[shot.answer]}\n\n" for shot in shots)
    return header + solved + _example(item)


def encode_mmlu_prompt(
    item: MMLUItem,
    shots: Sequence[MMLUItem],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    answer_prefix: Sequence[int] = (),
) -> EncodedPrompt:
    """Token ids of the prompt (+ `answer_prefix`), dropping the earliest shots to fit."""
    bos = _bos_ids(tokenizer)
    for first in range(len(shots) + 1):
        text = mmlu_prompt(item, shots[first:])
        ids = [*bos, *tokenizer.encode(text, add_special_tokens=False), *answer_prefix]
        if len(ids) <= max_length:
            return EncodedPrompt(ids, len(shots) - first, cut=False)
    body = ids[len(bos) :]  # even without shots too long: keep the question's end
    return EncodedPrompt([*bos, *body[len(body) - (max_length - len(bos)) :]], 0, cut=True)


def answer_token_ids(
    tokenizer: PreTrainedTokenizerBase, n_choices: int = 4
) -> tuple[list[int], list[int]]:
    """(tokens to append after "Answer:", one token per letter) for next-token scoring.

    " A" is usually one token. A tokenizer that splits it into a space token and "A" gets the
    shared space token appended to the prompt, so each letter is still one next token.
    """
    base = tokenizer.encode("Answer:", add_special_tokens=False)
    continuations = []
    for letter in LETTERS[:n_choices]:
        full = tokenizer.encode(f"Answer: {letter}", add_special_tokens=False)
        if full[: len(base)] != base:
            raise MMLUError(
                f"the tokenizer encodes 'Answer:' differently before {letter!r}; letter scoring "
                "needs the prompt's tokens to stay the same when a letter follows"
            )
        continuations.append(full[len(base) :])
    shared: list[int] = []
    while all(len(c) > len(shared) + 1 for c in continuations) and (
        len({c[len(shared)] for c in continuations}) == 1
    ):
        shared.append(continuations[0][len(shared)])
    letters = [c[len(shared) :] for c in continuations]
    if any(len(ids) != 1 for ids in letters) or len({ids[0] for ids in letters}) != n_choices:
        raise MMLUError(
            f"the answer letters do not encode as distinct single tokens after 'Answer:' "
            f"({dict(zip(LETTERS, continuations, strict=False))}); MMLU letter scoring needs them"
        )
    return shared, [ids[0] for ids in letters]


@torch.no_grad()
def choice_log_likelihoods(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    choice_ids: Sequence[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """[N, C] log-probability of each choice token as the next token after each prompt.

    Prompts of similar length are batched together, left-padded (with position ids that skip
    the padding) so every row's next-token logits sit at the last position.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    result = torch.empty(len(prompts), len(choice_ids), dtype=torch.float32)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    choices = torch.tensor(list(choice_ids), device=device)
    try:
        for start in track(
            range(0, len(order), batch_size),
            description="MMLU",
            console=console,
            disable=not progress,
            transient=True,
        ):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.zeros((len(rows), width), dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
                attention_mask[row, width - len(prompts[i]) :] = 1
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                logits_to_keep=1,
            ).logits[:, -1]
            log_probs = torch.log_softmax(logits.float(), dim=-1)[:, choices]
            result[rows] = log_probs.cpu()
    finally:
        model.train(was_training)
    return result


def _example(item: MMLUItem) -> str:
    options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    return f"{item.question}{options}\nAnswer:"


def _bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] if the tokenizer puts BOS in front of every text (Llama-style), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer.encode("a", add_special_tokens=True)[:1] == [bos] else []


def _percent(flags: Sequence[bool]) -> float:
    return 100.0 * sum(flags) / len(flags)

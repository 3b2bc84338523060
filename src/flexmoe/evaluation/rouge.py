"""ROUGE F1 with stemming as `rouge-score` computes it (the paper's metric), for any script.

rouge-score's tokenizer keeps only [a-z0-9], so Chinese, Japanese, Arabic, Cyrillic, ... text
scores 0 whatever the model says. `AnyScriptTokenizer` is that tokenizer with Unicode letters
kept: on ASCII text it yields exactly rouge-score's tokens, words of other scripts stay whole
(only ASCII words are stemmed; rouge-score splits "Zürich" into "z", "rich", this keeps
"zürich"), and each character of a script written without spaces between words (Chinese,
Japanese, Thai, ...) is a token of its own, the usual character-level ROUGE for those languages.
Text is NFKC-normalised first, so composed and decomposed accents, full-width letters and
ligatures compare equal.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import regex
from nltk.stem.porter import PorterStemmer
from rouge_score import rouge_scorer, tokenizers

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}"
TOKEN_RE = regex.compile(
    rf"[{UNSPACED}]\p{{M}}*"  # one character (with its marks) of an unspaced script
    rf"|(?:(?![{UNSPACED}])[\p{{L}}\p{{N}}])(?:(?![{UNSPACED}])[\p{{L}}\p{{N}}\p{{M}}])*"  # a word
)
ASCII_WORD_RE = regex.compile(r"[a-z0-9]+")


class AnyScriptTokenizer(tokenizers.Tokenizer):
    """rouge-score's tokenisation (lowercase, split on non-alphanumerics, Porter-stem words over
    3 characters) with every script's letters kept; see the module docstring."""

    def __init__(self) -> None:
        self.stemmer = PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        return [
            self.stemmer.stem(token) if len(token) > 3 and ASCII_WORD_RE.fullmatch(token) else token
            for token in TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())
        ]


def rouge_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 in percent over aligned prediction/reference pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=AnyScriptTokenizer())
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}

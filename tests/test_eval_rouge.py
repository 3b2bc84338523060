"""ROUGE F1 (the paper's metric): hand-computed values, rouge-score's own numbers and tokens on
English, and meaningful scores on scripts rouge-score drops."""

import pytest
from rouge_score import rouge_scorer, tokenizers

from flexmoe.data.bundled import read_bundled_jsonl
from flexmoe.evaluation.rouge import AnyScriptTokenizer, rouge_f1

PAIRS = [
    ("the cat sat on the mat", "The cat is on the mat."),
    ("running dogs", "the dog runs"),
]


def test_hand_computed_scores():
    # Pair 1: unigrams overlap in the x2, cat, on, mat: P = R = 5/6. Bigrams: "the cat", "on the",
    # "the mat" of 5 each: 3/5. LCS "the cat on the mat": 5/6.
    # Pair 2 (stemmed: run dog | the dog run): unigrams P = 2/2, R = 2/3 -> F = .8; no shared
    # bigram; LCS of length 1: P = 1/2, R = 1/3 -> F = .4.
    scores = rouge_f1([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert scores["rouge1"] == pytest.approx(100 * (5 / 6 + 0.8) / 2)
    assert scores["rouge2"] == pytest.approx(100 * (3 / 5 + 0) / 2)
    assert scores["rougeL"] == pytest.approx(100 * (5 / 6 + 0.4) / 2)


def test_equals_rouge_score_with_stemming():
    predictions = ["Paris is the capital of France.", "", "It was raining heavily all day"]
    references = ["The capital of France is Paris.", "nothing here", "it rained all day long"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        for name, score in scorer.score(reference, prediction).items():
            expected[name] += 100 * score.fmeasure / len(predictions)
    assert rouge_f1(predictions, references) == pytest.approx(expected)


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_f1(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        rouge_f1([], [])


def test_tokens_equal_rouge_scores_on_real_ascii_text():
    records = read_bundled_jsonl("dolly15k/dolly_closed_qa.jsonl")[:300]
    texts = [r[key] for r in records for key in ("context", "response") if r[key].isascii()]
    assert len(texts) > 400
    ours, theirs = AnyScriptTokenizer(), tokenizers.DefaultTokenizer(use_stemmer=True)
    for text in texts:
        assert ours.tokenize(text) == theirs.tokenize(text), text


def test_unspaced_scripts_score_per_character_and_other_scripts_per_word():
    # Chinese, per character: prediction 猫坐在垫子上 (6), reference 猫在垫子上 (5). Unigrams and
    # LCS share 5: P = 5/6, R = 1 -> F = 10/11. Bigrams share 在垫 垫子 子上: P = 3/5, R = 3/4 -> 2/3.
    chinese = rouge_f1(["猫坐在垫子上。"], ["猫在垫子上"])
    assert chinese == pytest.approx(
        {"rouge1": 100 * 10 / 11, "rouge2": 100 * 2 / 3, "rougeL": 100 * 10 / 11}
    )
    # Russian and Hindi (combining marks inside words) keep whole, case-folded words.
    assert rouge_f1(["Кошка сидит"], ["кошка спит"])["rouge1"] == pytest.approx(50.0)
    assert AnyScriptTokenizer().tokenize("नमस्ते दुनिया!") == ["नमस्ते", "दुनिया"]
    assert rouge_f1(["नमस्ते दुनिया"], ["नमस्ते"])["rouge1"] == pytest.approx(100 * 2 / 3)
    # Composed and decomposed accents, full-width letters and ligatures compare equal.
    assert AnyScriptTokenizer().tokenize("École ＡＢＣ ﬁne") == ["école", "abc", "fine"]
    assert AnyScriptTokenizer().tokenize("E\u0301cole") == ["école"]
    # Mixed text: Japanese characters one by one, the English word stemmed as rouge-score does.
    assert AnyScriptTokenizer().tokenize("running東京タワー") == [
        "run",
        "東",
        "京",
        "タ",
        "ワ",
        "ー",
    ]

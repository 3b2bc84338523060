"""The built-in base model: tokenizer, pretraining loop, held-out metrics, the saved directory."""

import itertools
import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexmoe.config import ConfigError, load
from flexmoe.data import DataWarning, corpus_documents, load_instructions
from flexmoe.models import default_model
from flexmoe.models.pretrain import (
    INSTRUCTION_SOURCES,
    METADATA_FILE,
    PretrainConfig,
    build_model,
    evaluate_heldout,
    learning_rate,
    pretrain,
    qwen2_moe_config,
    recipe_hash,
    save_model_dir,
    seen_in_pretraining,
)
from flexmoe.models.tokenizer import EOS_TOKEN, TokenizerTrainingError, train_tokenizer

TINY = PretrainConfig(
    vocab_size=384,
    tokenizer_chars=100_000,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=4,
    top_k=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    seq_len=64,
    batch_size=4,
    steps=25,
    warmup_steps=3,
    lr=1e-2,
    eval_tokens=1024,
)
ROUND_TRIP_TEXTS = [
    "Héllo wörld — naïve café, Ελληνικά, 日本語のテキスト, emoji 🤖🎉 and a ZWJ 👩‍💻",
    'def f(x):\n\tif x:\r\n        return {"a": [1, 2]}  # tab, CRLF, indentation\n',
    "  leading and trailing spaces  \n\n\nthree newlines, and a lone \r carriage return",
    "<|endoftext|> written as plain text is still text",
    "",
]


@pytest.fixture(autouse=True)
def _quiet_data_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the bundled sets skip a few empty rows
        yield


@pytest.fixture(scope="module")
def corpus_sample() -> list[str]:
    return corpus_documents("train")[:80]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        out = tmp_path_factory.mktemp("pretrain") / "tiny"
        return pretrain(TINY, out, progress=False)


def test_tokenizer_round_trips_any_text(corpus_sample, tmp_path):
    tokenizer = train_tokenizer(corpus_sample, 512)
    assert len(tokenizer) == 512
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ROUND_TRIP_TEXTS:
        assert reloaded.encode(text) == tokenizer.encode(text)
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_tokenizer_training_is_deterministic_and_learns_merges(corpus_sample):
    first, second = train_tokenizer(corpus_sample, 512), train_tokenizer(corpus_sample, 512)
    assert first.get_vocab() == second.get_vocab()
    text = " ".join(corpus_sample[:3])
    assert len(first.encode(text)) < len(text.encode("utf-8")) / 1.5  # merges compress text


def test_tokenizer_rejects_impossible_vocab_sizes(corpus_sample):
    with pytest.raises(TokenizerTrainingError, match="at least 258"):
        train_tokenizer(corpus_sample, 100)
    with pytest.raises(TokenizerTrainingError, match="pass more text"):
        train_tokenizer(["tiny text"], 4096)


def test_default_recipe_is_a_small_qwen2_moe_with_a_gated_shared_expert():
    cfg = PretrainConfig()
    config = qwen2_moe_config(cfg, eos_token_id=0, pad_token_id=1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert 5e6 <= parameters <= 15e6
    block = model.model.layers[0].mlp
    assert block.experts.gate_up_proj.shape[0] == cfg.num_experts
    assert block.shared_expert_gate.weight.shape == (1, cfg.hidden_size)
    assert config.num_experts_per_tok == cfg.top_k
    assert not config.output_router_logits  # the balancing loss is a pretraining-only term


def test_pretraining_reduces_the_loss(tiny_run):
    losses = tiny_run.train_losses
    assert len(losses) == TINY.steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert math.isfinite(tiny_run.heldout_perplexity)
    # Better than a uniform guess over the vocabulary, which a broken model would not beat.
    assert tiny_run.heldout_perplexity < TINY.vocab_size


def test_pretraining_is_deterministic_for_a_seed(tiny_run, tmp_path):
    again = pretrain(TINY, tmp_path / "again", progress=False)
    other_seed = pretrain(replace(TINY, seed=1), tmp_path / "seed1", progress=False)
    weights = load_file(tiny_run.path / "model.safetensors")
    same = load_file(again.path / "model.safetensors")
    other = load_file(other_seed.path / "model.safetensors")
    assert again.train_losses == tiny_run.train_losses
    assert again.heldout_perplexity == tiny_run.heldout_perplexity
    assert all(torch.equal(weights[name], same[name]) for name in weights)
    assert not all(torch.equal(weights[name], other[name]) for name in weights)


def test_saved_directory_loads_like_a_hub_checkpoint(tiny_run):
    model = AutoModelForCausalLM.from_pretrained(tiny_run.path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run.path)
    assert model.config.model_type == "qwen2_moe"
    assert tokenizer.eos_token_id == model.config.eos_token_id
    # The held-out score of the reloaded model is the one measured on the trained model.
    perplexity, bits_per_byte = evaluate_heldout(model, tokenizer, TINY.eval_tokens)
    assert perplexity == pytest.approx(tiny_run.heldout_perplexity, rel=1e-6)
    assert bits_per_byte == pytest.approx(tiny_run.heldout_bits_per_byte, rel=1e-6)
    metadata = json.loads((tiny_run.path / METADATA_FILE).read_text())
    assert metadata["recipe_hash"] == recipe_hash(TINY)
    assert metadata["heldout"]["perplexity"] == tiny_run.heldout_perplexity
    assert metadata["config"]["seed"] == TINY.seed
    assert set(metadata["data"]["sources"]) == {"corpus", *INSTRUCTION_SOURCES}


def test_save_and_reload_give_identical_logits(corpus_sample, tmp_path):
    tokenizer = train_tokenizer(corpus_sample, TINY.vocab_size)
    model = build_model(TINY, tokenizer).eval()
    save_model_dir(model, tokenizer, {"recipe_hash": "test"}, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "model").encode("Hello there")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_heldout_metrics_of_a_uniform_model_are_exact(corpus_sample):
    tokenizer = train_tokenizer(corpus_sample, TINY.vocab_size)
    model = build_model(TINY, tokenizer).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # all logits 0: every token has probability 1 / vocab
    perplexity, bits_per_byte = evaluate_heldout(model, tokenizer, 500)
    assert perplexity == pytest.approx(TINY.vocab_size, rel=1e-5)
    ids = []
    for article in corpus_documents("heldout")[:2]:
        ids += [*tokenizer.encode(article, add_special_tokens=False), tokenizer.eos_token_id]
    scored_bytes = len(tokenizer.decode(ids[1:501], skip_special_tokens=True).encode("utf-8"))
    assert bits_per_byte == pytest.approx(500 * math.log2(TINY.vocab_size) / scored_bytes)


def test_interrupted_write_leaves_nothing_that_looks_complete(corpus_sample, tmp_path):
    tokenizer = train_tokenizer(corpus_sample, TINY.vocab_size)
    model = build_model(TINY, tokenizer)
    out = tmp_path / "model"
    save_model_dir(model, tokenizer, {"recipe_hash": "first"}, out)
    first_weights = load_file(out / "model.safetensors")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # the second build has other weights
    tokenizer.save_pretrained = killed  # killed after the weights were written
    with pytest.raises(KeyboardInterrupt):
        save_model_dir(model, tokenizer, {"recipe_hash": "second"}, out)
    # The previous complete build is untouched: same metadata, same weights.
    assert json.loads((out / METADATA_FILE).read_text()) == {"recipe_hash": "first"}
    kept = load_file(out / "model.safetensors")
    assert all(torch.equal(first_weights[name], kept[name]) for name in first_weights)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no partial directory left


def test_ensure_default_model_rebuilds_partial_or_stale_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXMOE_HOME", str(tmp_path))
    built = []

    def fake_pretrain(cfg, out_dir, *, progress):
        built.append(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in default_model.REQUIRED_FILES:
            (out_dir / name).write_text("{}")
        (out_dir / METADATA_FILE).write_text(json.dumps({"recipe_hash": recipe_hash(cfg)}))

    monkeypatch.setattr(default_model, "pretrain", fake_pretrain)
    model_dir = default_model.default_model_dir()
    assert model_dir.parent == tmp_path / "models"
    # A killed build that got as far as the weights but not the metadata is not accepted.
    model_dir.mkdir(parents=True)
    for name in default_model.REQUIRED_FILES:
        (model_dir / name).write_text("{}")
    assert default_model.ensure_default_model(progress=False) == model_dir
    assert built == [model_dir]
    # A complete build is reused as is.
    assert default_model.ensure_default_model(progress=False) == model_dir
    assert built == [model_dir]
    # A build of another recipe is not.
    (model_dir / METADATA_FILE).write_text(json.dumps({"recipe_hash": "another-recipe"}))
    default_model.ensure_default_model(progress=False)
    assert built == [model_dir, model_dir]


def test_flexmoe_home_and_recipe_hash_name_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXMOE_HOME", str(tmp_path))
    assert default_model.model_dir_for(TINY).parent == tmp_path / "models"
    assert default_model.model_dir_for(TINY) != default_model.model_dir_for(replace(TINY, seed=1))
    monkeypatch.delenv("FLEXMOE_HOME")
    assert default_model.flexmoe_home() == Path("~/.cache/flexmoe").expanduser()


def test_pretraining_share_is_a_stable_hash_of_the_id():
    ids = [r.id for r in load_instructions("dolly", split="train")]
    seen = [i for i in ids if seen_in_pretraining(i, 0.5)]
    assert 0.47 < len(seen) / len(ids) < 0.53
    assert all(seen_in_pretraining(i, 0.8) for i in seen)  # a larger share only adds records
    assert all(seen_in_pretraining(i, 1.0) for i in ids)
    assert seen_in_pretraining("dolly-closed_qa-00000", 0.5) == seen_in_pretraining(
        "dolly-closed_qa-00000", 0.5
    )


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = replace(TINY, steps=100, warmup_steps=10, lr=1e-2, min_lr_ratio=0.1)
    rates = [learning_rate(step, cfg) for step in range(cfg.steps)]
    assert rates[0] == pytest.approx(1e-3)
    assert rates[9] == pytest.approx(1e-2) == max(rates)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(1e-3, rel=0.01)
    short = replace(cfg, steps=5, warmup_steps=60)  # warmup capped: still reaches the peak
    assert [learning_rate(step, short) for step in range(5)][-1] == pytest.approx(1e-2)


def test_config_overrides_merge_into_the_mixture_and_bad_values_are_named(tmp_path):
    cfg = load(PretrainConfig, None, ["mix.code_alpaca=0", "steps=10"])
    assert cfg.mix.code_alpaca == 0 and cfg.mix.dolly == PretrainConfig().mix.dolly
    assert cfg.steps == 10
    with pytest.raises(ConfigError, match="top_k=9 exceeds num_experts=8"):
        replace(PretrainConfig(), num_experts=8, top_k=9).validate()
    with pytest.raises(ConfigError, match="lr must be a number, got 'fast'"):
        load(PretrainConfig, None, ["lr=fast"])
    with pytest.raises(ConfigError, match="experts_implementation"):
        replace(PretrainConfig(), experts_implementation="fast").validate()
    no_data = [f"mix.{name}=0" for name in ("corpus", *INSTRUCTION_SOURCES)]
    with pytest.raises(ConfigError, match="mix weights"):
        load(PretrainConfig, None, no_data).validate()

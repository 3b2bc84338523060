"""Training throughput of candidate pretraining recipes, measured side by side in one process.

Why: the built-in model gets a fixed ~10-minute budget, so what matters is how much text a recipe
learns from per second. Each candidate is a `PretrainConfig` variant. One full training step
(forward with the router's balancing loss, backward, clipping, AdamW) is timed round-robin over
the candidates, so load from other processes on the machine hits all of them alike; the median
step time gives tokens/s. Tokens differ in size between vocabularies, so the table also gives
held-out bytes/s (tokens/s x UTF-8 bytes per token of that candidate's tokenizer on WikiText-2
test), all relative to the reference recipe (the 10.8M model of the issue).

Usage: python benchmarks/pretrain_throughput.py [--rounds 5] [--threads 2]
Writes pretrain_throughput.json and pretrain_throughput.md next to this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

from flexmoe.config import to_dict
from flexmoe.data import DataWarning, corpus_documents
from flexmoe.models.pretrain import (
    MixtureBatches,
    PretrainConfig,
    build_model,
    count_parameters,
    keep_freed_memory,
    make_optimizer,
    pretraining_documents,
    tokenizer_sample,
    training_step,
)
from flexmoe.models.tokenizer import train_tokenizer
from flexmoe.runtime import configure_threads

HERE = Path(__file__).parent
DEFAULT = PretrainConfig()
REFERENCE = replace(DEFAULT, precision="fp32", seq_len=256, batch_size=16)
"""The issue's reference: the default shape (hidden 256, 4 layers, 16 experts top-4 of width 128,
shared 512, vocab 8192) in fp32 with 16 x 256-token batches."""
LEAN = replace(
    DEFAULT,
    precision="fp32",
    vocab_size=4096,
    top_k=2,
    moe_intermediate_size=192,
    shared_expert_intermediate_size=256,
    norm_topk_prob=True,
    batch_size=2,
)
"""The previous default: fewer active parameters per token, fp32, 2 x 512-token batches."""

CANDIDATES: dict[str, PretrainConfig] = {
    "reference: fp32, 16x256": REFERENCE,
    "reference, bf16 autocast": replace(REFERENCE, precision="bf16-autocast"),
    "default recipe: bf16, 4x512": DEFAULT,
    "default, fp32": replace(DEFAULT, precision="fp32"),
    "default, eager experts": replace(DEFAULT, experts_implementation="eager"),
    "default, 8x512": replace(DEFAULT, batch_size=8),
    "default, 2x512": replace(DEFAULT, batch_size=2),
    "lean v4096 k2 I192 S256, fp32, 2x512": LEAN,
    "lean, bf16, 8x512": replace(LEAN, precision="bf16-autocast", batch_size=8),
}


BUDGET_SECONDS = 540
"""Training time the default recipe may use: ten minutes minus data, tokenizer and evaluation."""


class Candidate:
    """A model, its optimizer and an endless batch stream, ready to time one step at a time."""

    def __init__(self, cfg: PretrainConfig, tokenizer, documents) -> None:
        self.cfg = cfg
        self.model = build_model(cfg, tokenizer)
        self.model.train()
        self.optimizer = make_optimizer(self.model, cfg)
        mix = to_dict(cfg.mix)
        self.batches = iter(
            MixtureBatches(
                documents,
                mix,
                tokenizer,
                batch_size=cfg.batch_size,
                seq_len=cfg.seq_len,
                seed=cfg.seed,
            )
        )
        self.step_seconds: list[float] = []

    def step(self) -> float:
        input_ids = next(self.batches)
        start = time.perf_counter()
        training_step(self.model, self.optimizer, input_ids, self.cfg)
        return time.perf_counter() - start


def heldout_bytes_per_token(tokenizer) -> float:
    articles = corpus_documents("heldout")
    tokens = sum(len(ids) for ids in tokenizer(articles, add_special_tokens=False)["input_ids"])
    return sum(len(article.encode("utf-8")) for article in articles) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per candidate")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    keep_freed_memory()
    warnings.simplefilter("ignore", DataWarning)

    documents = pretraining_documents(DEFAULT)
    tokenizers, bytes_per_token = {}, {}
    for vocab in sorted({cfg.vocab_size for cfg in CANDIDATES.values()}):
        tokenizers[vocab] = train_tokenizer(
            tokenizer_sample(documents, replace(DEFAULT, vocab_size=vocab)), vocab
        )
        bytes_per_token[vocab] = heldout_bytes_per_token(tokenizers[vocab])
    candidates = {
        name: Candidate(cfg, tokenizers[cfg.vocab_size], documents)
        for name, cfg in CANDIDATES.items()
    }
    for candidate in candidates.values():  # warm-up: allocator, kernels' first calls
        candidate.step()
        candidate.step()
    for round_index in range(args.rounds):
        for candidate in candidates.values():
            candidate.step_seconds.append(candidate.step())
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    rows = []
    for name, candidate in candidates.items():
        cfg = candidate.cfg
        seconds = statistics.median(candidate.step_seconds)
        tokens_per_second = cfg.batch_size * cfg.seq_len / seconds
        rows.append(
            {
                "name": name,
                "parameters_m": round(count_parameters(candidate.model) / 1e6, 2),
                "step_seconds": round(seconds, 3),
                "tokens_per_second": round(tokens_per_second, 1),
                "heldout_bytes_per_token": round(bytes_per_token[cfg.vocab_size], 3),
                "bytes_per_second": round(tokens_per_second * bytes_per_token[cfg.vocab_size], 1),
                "config": to_dict(cfg),
            }
        )
    reference = rows[0]
    for row in rows:
        row["tokens_per_second_vs_reference"] = round(
            row["tokens_per_second"] / reference["tokens_per_second"], 3
        )
        row["bytes_per_second_vs_reference"] = round(
            row["bytes_per_second"] / reference["bytes_per_second"], 3
        )
    default = next(row for row in rows if row["config"] == to_dict(DEFAULT))
    steps_in_budget = round(
        BUDGET_SECONDS * default["tokens_per_second"] / (DEFAULT.batch_size * DEFAULT.seq_len)
    )
    result = {
        "threads": threads,
        "rounds": args.rounds,
        "candidates": rows,
        "default_recipe_steps_in_budget": steps_in_budget,
    }
    (HERE / "pretrain_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Pretraining step throughput, {threads} thread(s), median of {args.rounds} steps, "
        "measured round-robin in one process (`python benchmarks/pretrain_throughput.py`).",
        "",
        "| candidate | params (M) | s/step | tokens/s | x ref | bytes/token | bytes/s x ref |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['parameters_m']} | {row['step_seconds']} | "
            f"{row['tokens_per_second']:.0f} | {row['tokens_per_second_vs_reference']} | "
            f"{row['heldout_bytes_per_token']} | {row['bytes_per_second_vs_reference']} |"
        )
    lines += [
        "",
        f"Budget: at the default recipe's rate measured here, {BUDGET_SECONDS / 60:.0f} minutes "
        f"of training hold {steps_in_budget} steps of {DEFAULT.batch_size} x {DEFAULT.seq_len}; "
        f"the recipe uses {DEFAULT.steps} (the data loader's tokenization is not timed here).",
    ]
    (HERE / "pretrain_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Pretrain flexmoe's built-in base model from scratch: a small Qwen2-MoE and its tokenizer, on CPU.

FLEx needs a base model whose routed experts already hold knowledge worth preserving, and every
flexmoe command needs one without a hub download. This module builds it in about ten minutes on
two CPU cores: a byte-level BPE tokenizer, then a Qwen2-MoE (the Qwen1.5-MoE architecture: routed
experts plus a sigmoid-gated shared expert in every layer) trained for a fixed number of steps —
never a wall-clock stop, so a seed gives the same model on any machine with the same thread count.

Data. Packed sequences (documents joined by EOS, no padding) drawn from weighted sources: the
bundled corpus (Tiny Shakespeare, Wikipedia, C4) and the instruction sets rendered with the
Alpaca template that fine-tuning uses later. Held-out rule for instruction data: only records of
the `train` split whose id falls in the pretraining share (`seen_in_pretraining`: a SHA-256 hash
of the id, below `instruction_share`) are used, for every set including Dolly. The other records
are never seen by the base model, so any test set drawn from them (federated per-client test items,
domain evaluations) is clean, and Dolly's own test split is never touched. The rule and share are
written into the model's `flexmoe_pretrain.json`.

Evaluation. Perplexity and bits per byte on WikiText-2 test (`corpus_documents("heldout")`), a
text it never trains on; bits per byte do not depend on the vocabulary, so recipes with different
tokenizers compare fairly.

Recipe (the `PretrainConfig` defaults), chosen by full-length runs scored on the same held-out text:
- the reference shape flexmoe started from: vocab 8192, hidden 256, 4 layers, 16 experts top-4 of width 128,
  shared expert 512 (10.77M parameters). A leaner shape (top-2, width 192, shared 256, vocab 4096)
  ran 1.5x the tokens/s but learned less per token and lost at equal time (2.79-2.83 vs 2.76 bits
  per byte);
- bf16 autocast: bf16 matmuls, fp32 weights and AdamW state; 1.27x the fp32 step rate on this
  machine's CPU (avx512_bf16);
- small batches, 4 x 512 tokens: per token, more optimizer steps learn faster in this short
  regime (probes of 2.05M tokens: 2.685 bits/byte with 4 x 512 at lr 1.5e-3 vs 2.730 with 8 x 512 at lr 2e-3;
  with the leaner shape lr 3e-3 was worse than 2e-3: 2.91 vs 2.83). 512-token sequences, so
  fine-tuning prompts fit the trained length;
- AdamW lr 1.5e-3, 40 warmup steps, cosine to 10%; 960 steps (~1.97M tokens): 9.8 minutes of
  training at 3,344 tokens/s on two idle cores, 10.1 minutes in all.
Result: WikiText-2 perplexity 756.5 (2.689 bits/byte). The reference recipe (fp32, 400
steps of 16 x 256 tokens, lr 2e-3), rerun here and scored the same way: perplexity 895.0 (2.757
bits/byte) in 8.7 minutes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import random
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import PreTrainedTokenizerBase, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.utils import logging as hf_logging

from flexmoe import __version__
from flexmoe.config import ConfigError, to_dict
from flexmoe.data import build_prompt, corpus_documents, load_instructions
from flexmoe.models.tokenizer import train_tokenizer
from flexmoe.runtime import console, seed_everything

RECIPE_VERSION = 1
"""Bump when the code changes what a config produces (data, loop); it is part of `recipe_hash`."""
METADATA_FILE = "flexmoe_pretrain.json"
"""Written last into a model directory: its presence marks a complete build."""
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")
PRECISIONS = ("fp32", "bf16-autocast")
INSTRUCTION_SOURCES = ("dolly", "alpaca", "alpaca_gpt4", "code_alpaca", "medical")


@dataclass
class DataMix:
    """Relative sampling weights of the pretraining sources, per packed sequence (any positive sum).

    Mostly instruction text shaped like the later fine-tuning data, plus general text. Dolly's
    contexts are Wikipedia passages, which also serves the WikiText held-out set.
    """

    corpus: float = 0.3
    dolly: float = 0.3
    alpaca: float = 0.15
    alpaca_gpt4: float = 0.05
    code_alpaca: float = 0.05
    medical: float = 0.15


@dataclass
class PretrainConfig:
    """Everything that determines the built-in model; defaults are the tuned recipe."""

    seed: int = 0
    # tokenizer
    vocab_size: int = 8192
    tokenizer_chars: int = 4_000_000
    """Characters of the mixture the BPE is trained on (more barely changes bytes per token)."""
    # architecture (Qwen2-MoE)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 16
    top_k: int = 4
    moe_intermediate_size: int = 128
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = False
    tie_word_embeddings: bool = True
    router_aux_loss_coef: float = 0.01
    experts_implementation: str = "grouped_mm"
    precision: str = "bf16-autocast"
    """Training compute: fp32, or bf16-autocast (bf16 matmuls, fp32 weights and optimizer; faster
    on CPUs with bf16 instructions). The saved model is fp32 either way."""
    # data
    seq_len: int = 512
    batch_size: int = 4
    instruction_share: float = 0.5
    mix: DataMix = field(default_factory=DataMix)
    # optimisation: AdamW, linear warmup, cosine decay to min_lr_ratio * lr
    steps: int = 960
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # evaluation
    eval_tokens: int = 65_536
    """Held-out tokens scored at the end (WikiText-2 test holds about 400k)."""

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent option and how to fix it."""
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
        positive += ("num_experts", "top_k", "moe_intermediate_size", "seq_len", "batch_size")
        positive += ("shared_expert_intermediate_size", "steps", "eval_tokens", "tokenizer_chars")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ConfigError(
                f"experts_implementation={self.experts_implementation!r}: choose one of "
                f"{', '.join(EXPERTS_IMPLEMENTATIONS)} (grouped_mm is the fast one on CPU)"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}"
            )
        if not 0 < self.instruction_share <= 1:
            raise ConfigError(f"instruction_share must be in (0, 1], got {self.instruction_share}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}"
            )
        weights = to_dict(self.mix)
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"mix weights must be >= 0 with a positive sum, got {weights}")


@dataclass
class PretrainResult:
    path: Path
    num_parameters: int
    steps: int
    seconds: float
    """Wall time of the training steps (tokenizer, data and evaluation excluded)."""
    tokens_per_second: float
    heldout_perplexity: float
    heldout_bits_per_byte: float
    train_losses: list[float]
    """Language-model loss of every step (without the router's load-balancing term)."""


def recipe_hash(cfg: PretrainConfig) -> str:
    """A short digest of the config and the recipe version: a changed recipe gets a new name."""
    payload = json.dumps({"recipe": RECIPE_VERSION, "config": to_dict(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def seen_in_pretraining(record_id: str, instruction_share: float) -> bool:
    """Whether a train-split instruction record with this id is in the pretraining share.

    A hash of the id, not a random draw, so any later stage can tell without the pretraining run.
    """
    digest = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big")
    return digest / 2**64 < instruction_share


def pretraining_documents(cfg: PretrainConfig) -> dict[str, list[str]]:
    """Each source's documents: the corpus as is, instruction records as Alpaca prompt+response."""
    sources = {"corpus": corpus_documents("train")}
    for name in INSTRUCTION_SOURCES:
        records = load_instructions(name, split="train")
        sources[name] = [
            build_prompt(r) + r.response
            for r in records
            if seen_in_pretraining(r.id, cfg.instruction_share)
        ]
    return sources


class TokenStream:
    """One source as an endless stream of packed tokens: documents shuffled, each followed by EOS.

    Documents are encoded lazily, as the stream is consumed, so a short run tokenizes little text;
    when a source is used up it is reshuffled and repeated (`epochs` counts the passes begun).
    """

    def __init__(self, documents: Sequence[str], tokenizer, rng: random.Random) -> None:
        if not documents:
            raise ConfigError("a pretraining source with a positive weight has no documents")
        self.documents, self.tokenizer, self.rng = list(documents), tokenizer, rng
        self.order: list[int] = []
        self.buffer: list[int] = []
        self.epochs = 0

    def take(self, n: int) -> list[int]:
        while len(self.buffer) < n:
            if not self.order:
                self.order = list(range(len(self.documents)))
                self.rng.shuffle(self.order)
                self.epochs += 1
            batch = [self.documents[i] for i in self.order[:64]]
            del self.order[:64]
            for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]:
                self.buffer += [*ids, self.tokenizer.eos_token_id]
        taken, self.buffer = self.buffer[:n], self.buffer[n:]
        return taken


class MixtureBatches:
    """Batches of packed sequences; each row comes from a source drawn by the mixture weights."""

    def __init__(
        self,
        documents: dict[str, list[str]],
        weights: dict[str, float],
        tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
    ) -> None:
        self.names = [name for name, weight in weights.items() if weight > 0]
        self.weights = [weights[name] for name in self.names]
        self.streams = {
            name: TokenStream(documents[name], tokenizer, random.Random(f"{seed}-{name}"))
            for name in self.names
        }
        self.rng = random.Random(seed)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.tokens = dict.fromkeys(self.names, 0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            rows = []
            for name in self.rng.choices(self.names, self.weights, k=self.batch_size):
                rows.append(self.streams[name].take(self.seq_len))
                self.tokens[name] += self.seq_len
            yield torch.tensor(rows, dtype=torch.long)

    def report(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "weight": weight,
                "documents": len(self.streams[name].documents),
                "tokens_trained": self.tokens[name],
                "passes_begun": self.streams[name].epochs,
            }
            for name, weight in zip(self.names, self.weights, strict=True)
        }


def tokenizer_sample(documents: dict[str, list[str]], cfg: PretrainConfig) -> list[str]:
    """About `tokenizer_chars` characters, drawn from the sources in proportion to the mixture."""
    weights = to_dict(cfg.mix)
    total = sum(weights.values())
    rng = random.Random(cfg.seed)
    sample = []
    for name, docs in documents.items():
        budget = cfg.tokenizer_chars * weights[name] / total
        shuffled = rng.sample(docs, len(docs))
        taken = 0
        for doc in shuffled:
            if taken >= budget:
                break
            sample.append(doc)
            taken += len(doc)
    return sample


def qwen2_moe_config(
    cfg: PretrainConfig, *, eos_token_id: int, pad_token_id: int
) -> Qwen2MoeConfig:
    """The transformers config of the model `cfg` describes (every layer sparse, as Qwen1.5-MoE)."""
    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.norm_topk_prob,
        moe_intermediate_size=cfg.moe_intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
        intermediate_size=cfg.shared_expert_intermediate_size,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=cfg.tie_word_embeddings,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        experts_implementation=cfg.experts_implementation,
    )


def build_model(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2MoeForCausalLM:
    """A freshly initialised Qwen2-MoE of the config's shape (seeded by `cfg.seed`)."""
    if len(tokenizer) != cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but vocab_size={cfg.vocab_size}"
        )
    config = qwen2_moe_config(
        cfg, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(cfg.seed)
    return Qwen2MoeForCausalLM(config)


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and expert stacks only, not on norms or biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step.

    The warmup is capped at `steps`, so a short run (`--steps 20`) needs no other change.
    """
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def training_step(
    model: Qwen2MoeForCausalLM,
    optimizer: torch.optim.Optimizer,
    input_ids: torch.Tensor,
    cfg: PretrainConfig,
) -> float:
    """One optimizer step on a batch (LM loss + the router's balancing loss); returns the LM loss."""
    with torch.autocast("cpu", torch.bfloat16, enabled=cfg.precision == "bf16-autocast"):
        out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item()


def train_steps(
    model: Qwen2MoeForCausalLM,
    batches: Iterator[torch.Tensor],
    cfg: PretrainConfig,
    *,
    progress: bool,
) -> tuple[list[float], float]:
    """Run `cfg.steps` optimizer steps; returns the per-step LM losses and the seconds taken."""
    optimizer = make_optimizer(model, cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses: list[float] = []
    model.train()
    columns = (
        TextColumn("[bold]pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    start = time.perf_counter()
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("pretrain", total=cfg.steps, loss=float("nan"), tps=0.0)
        for step, input_ids in zip(range(cfg.steps), batches, strict=False):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            losses.append(training_step(model, optimizer, input_ids, cfg))
            elapsed = time.perf_counter() - start
            smoothed = sum(losses[-10:]) / len(losses[-10:])
            bar.update(task, advance=1, loss=smoothed, tps=(step + 1) * tokens_per_step / elapsed)
    model.eval()
    return losses, time.perf_counter() - start


@torch.no_grad()
def evaluate_heldout(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    *,
    context_length: int | None = None,
    batch_size: int = 8,
) -> tuple[float, float]:
    """Perplexity and bits per byte on the first `max_tokens` tokens of WikiText-2 test.

    The articles are joined by EOS and cut into consecutive windows of `context_length` tokens
    (default: the model's trained length, at most 1024); every token after the first is predicted
    exactly once, from the tokens before it in its window. Bits per byte divide the summed loss by
    the UTF-8 bytes of the predicted text, so they compare across tokenizers.
    """
    length = context_length or min(model.config.max_position_embeddings, 1024)
    ids: list[int] = []
    for article in corpus_documents("heldout"):
        if len(ids) > max_tokens:
            break
        ids += tokenizer.encode(article, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    ids = ids[: max_tokens + 1]
    windows = [ids[start : start + length + 1] for start in range(0, len(ids) - 1, length)]
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        for same_length in _by_length(group):
            chunk = torch.tensor(same_length, dtype=torch.long)
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            targets = chunk[:, 1:]
            total_nll += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
            ).item()
            total_tokens += targets.numel()
    scored_bytes = len(tokenizer.decode(ids[1:], skip_special_tokens=True).encode("utf-8"))
    perplexity = math.exp(total_nll / total_tokens)
    bits_per_byte = total_nll / math.log(2) / scored_bytes
    return perplexity, bits_per_byte


def _by_length(windows: list[list[int]]) -> list[list[list[int]]]:
    """Group windows by length so each group stacks into one tensor (only the last differs)."""
    groups: dict[int, list[list[int]]] = {}
    for window in windows:
        groups.setdefault(len(window), []).append(window)
    return list(groups.values())


def keep_freed_memory() -> None:
    """Keep freed memory in the process instead of returning it to the OS (glibc only).

    A training step allocates and frees the same large buffers (logits, expert activations); by
    default glibc gives blocks above a few MB back to the kernel and every step page-faults them
    in again. Measured here: ~150k page faults per step, gone with this, ~10% faster steps.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once (tied embeddings share one tensor)."""
    return sum(p.numel() for p in model.parameters())


def pretrain(cfg: PretrainConfig, out_dir: Path, *, progress: bool = True) -> PretrainResult:
    """Train the tokenizer and the model, score them on held-out text, save an HF model directory.

    The directory (config.json, model.safetensors, tokenizer files, `flexmoe_pretrain.json`) is
    written under a temporary name and renamed into place, so an interrupted build never leaves a
    directory that looks complete; an existing `out_dir` is replaced. Calls `keep_freed_memory`,
    which lasts for the rest of the process.
    """
    cfg.validate()
    out_dir = Path(out_dir).expanduser()
    started = time.perf_counter()
    keep_freed_memory()
    seed_everything(cfg.seed)
    documents = pretraining_documents(cfg)
    console.log(
        "pretraining documents: "
        + ", ".join(f"{name} {len(docs):,}" for name, docs in documents.items())
    )
    tokenizer = train_tokenizer(tokenizer_sample(documents, cfg), cfg.vocab_size)
    model = build_model(cfg, tokenizer)
    num_parameters = count_parameters(model)
    console.log(
        f"Qwen2-MoE with {num_parameters / 1e6:.2f}M parameters; "
        f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, {torch.get_num_threads()} "
        "threads"
    )
    batches = MixtureBatches(
        documents,
        to_dict(cfg.mix),
        tokenizer,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
    losses, train_seconds = train_steps(model, iter(batches), cfg, progress=progress)
    tokens_per_second = cfg.steps * cfg.batch_size * cfg.seq_len / train_seconds
    perplexity, bits_per_byte = evaluate_heldout(model, tokenizer, cfg.eval_tokens)
    console.log(
        f"held-out WikiText-2: perplexity {perplexity:.1f}, {bits_per_byte:.3f} bits per byte "
        f"({tokens_per_second:,.0f} tokens/s)"
    )
    metadata = {
        "flexmoe_version": __version__,
        "recipe_version": RECIPE_VERSION,
        "recipe_hash": recipe_hash(cfg),
        "config": to_dict(cfg),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "num_parameters": num_parameters,
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "tokens_per_second": round(tokens_per_second, 1),
        "heldout": {
            "text": "WikiText-2 raw test (flexmoe.data.corpus_documents('heldout'))",
            "tokens": cfg.eval_tokens,
            "perplexity": perplexity,
            "bits_per_byte": bits_per_byte,
        },
        "data": {
            "rule": (
                "corpus_documents('train') plus instruction records with split == 'train' and "
                "seen_in_pretraining(id, instruction_share) (SHA-256 of the id below the share), "
                "rendered as Alpaca prompt + response; packed with EOS between documents"
            ),
            "instruction_share": cfg.instruction_share,
            "sources": batches.report(),
        },
        "loss_curve": [
            [step + 1, round(sum(losses[max(0, step - 9) : step + 1]) / min(10, step + 1), 4)]
            for step in range(9, len(losses), 10)
        ],
    }
    save_model_dir(model, tokenizer, metadata, out_dir)
    return PretrainResult(
        path=out_dir,
        num_parameters=num_parameters,
        steps=cfg.steps,
        seconds=train_seconds,
        tokens_per_second=tokens_per_second,
        heldout_perplexity=perplexity,
        heldout_bits_per_byte=bits_per_byte,
        train_losses=losses,
    )


def save_model_dir(model, tokenizer, metadata: dict, out_dir: Path) -> None:
    """Write model, tokenizer and metadata (last) to a temporary sibling, then rename into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    partial.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stay on the final directory
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is only noise
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            shutil.rmtree(old)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def read_metadata(model_dir: Path) -> dict | None:
    """The `flexmoe_pretrain.json` of a complete build, or None (missing, partial or unreadable)."""
    try:
        return json.loads((Path(model_dir) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None

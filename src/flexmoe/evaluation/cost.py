"""Inference cost of the grafted expert: active parameters, FLOPs per token and measured latency.

Every token of a grafted model runs its top-k routed experts plus the grafted one(s) and gate(s)
(k + r experts). `active_params_per_token` counts the parameters one token is multiplied by:
- attention projections, routers, shared experts, dense MLPs and other per-token modules: all;
- routed experts: top_k / num_experts of each MoE layer's expert tensors;
- the graft: every grafted expert and gate (LoRA adapters on them included, unmerged);
- lm_head: its matmul (V x H) — the input embedding is a table lookup, not compute, and is left
  out; tied embeddings therefore still count once, as the output matmul;
- norms are elementwise scales, reported but not counted.
FLOPs per token = 2 x active parameters (one multiply-add per weight; biases are counted the
same, which is negligible). Attention's context-dependent score/value products
(4 x context x attention width per layer) are left out: they are the same with and without a
graft, so leaving them out makes the graft's relative cost an upper bound.

`inference_cost` puts two models side by side and also measures greedy generation latency: the
same prompts, exactly `max_new_tokens` new tokens each (EOS suppressed, so both models do the
same work), base and grafted alternating within each repeat, median over repeats.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch
from rich.progress import track
from torch import nn
from transformers import PreTrainedTokenizerBase

from flexmoe.flex import find_grafts, remove_graft
from flexmoe.moe import Role, assign_roles, find_moe_layers
from flexmoe.runtime import console

_PER_TOKEN_ROLES = {
    Role.ATTENTION: "attention",
    Role.ROUTER: "router",
    Role.SHARED_EXPERT: "shared_experts",
    Role.DENSE_MLP: "dense_mlp",
    Role.OTHER: "other",
}
COUNTED = (
    "attention",
    "router",
    "routed_experts",
    "shared_experts",
    "dense_mlp",
    "graft_experts",
    "graft_gates",
    "lm_head",
    "other",
)
"""The components summed into `active_params` (see the module docstring)."""


class CostError(ValueError):
    """A cost measurement that cannot run as asked; the message says what to change."""


def active_params_per_token(model: nn.Module) -> dict[str, int]:
    """Per-component parameters one token uses, their sum `active_params`, `flops_per_token`
    (2 x active), and for reference `norms`, `embedding_lookup` and `total_params`."""
    parameters = dict(model.named_parameters())
    layers = find_moe_layers(model)
    cost = dict.fromkeys((*COUNTED, "norms"), 0)
    for name, role in assign_roles(model).items():
        numel = parameters[name].numel()
        if role == Role.ROUTED_EXPERT:
            layer = next(layer for layer in layers if name.startswith(f"{layer.path}."))
            cost["routed_experts"] += numel * layer.top_k // layer.num_experts
        elif role == Role.NORM:
            cost["norms"] += numel
        elif role in _PER_TOKEN_ROLES:
            cost[_PER_TOKEN_ROLES[role]] += numel
        # EMBEDDING: the lm_head matmul is counted below; PERSONAL: the grafts, below.
    for graft in find_grafts(model).values():
        cost["graft_experts"] += sum(p.numel() for p in graft.grafted.parameters())
        if graft.gates is not None:
            cost["graft_gates"] += sum(p.numel() for p in graft.gates.parameters())
    output = model.get_output_embeddings()
    cost["lm_head"] = sum(p.numel() for p in output.parameters())
    active = sum(cost[key] for key in COUNTED)
    return {
        **cost,
        "active_params": active,
        "flops_per_token": 2 * active,
        "embedding_lookup": model.get_input_embeddings().weight.numel(),
        "total_params": sum(p.numel() for p in parameters.values()),
    }


def inference_cost(
    base_model: nn.Module | None,
    grafted_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    repeats: int = 5,
    progress: bool = True,
) -> dict:
    """Active parameters and FLOPs per token of both models, and their generation latency.

    `base_model=None` compares against a copy of `grafted_model` with its grafts removed. Ratios
    are grafted / base. The latency ratio is the median of the per-repeat ratios (each repeat
    times both models back to back, so load from other processes mostly cancels out).
    """
    if base_model is grafted_model:
        raise CostError(
            "base_model and grafted_model are the same object; pass base_model=None to compare "
            "against the model without its grafts"
        )
    if not prompts or max_new_tokens < 1 or repeats < 1:
        raise CostError("need at least one prompt, max_new_tokens >= 1 and repeats >= 1")
    if base_model is None:
        base_model = copy.deepcopy(grafted_model)
        remove_graft(base_model)
    base, grafted = active_params_per_token(base_model), active_params_per_token(grafted_model)
    base_seconds, grafted_seconds = [], []
    _generate(base_model, tokenizer, prompts, max_new_tokens)  # warm-up, not timed
    _generate(grafted_model, tokenizer, prompts, max_new_tokens)
    for repeat in track(
        range(repeats),
        description="generation latency",
        console=console,
        disable=not progress,
        transient=True,
    ):
        order = [(base_model, base_seconds), (grafted_model, grafted_seconds)]
        for model, times in order if repeat % 2 == 0 else order[::-1]:
            times.append(_generate(model, tokenizer, prompts, max_new_tokens))
    ratios = [g / b for g, b in zip(grafted_seconds, base_seconds, strict=True)]
    return {
        "base": base,
        "grafted": grafted,
        "extra_active_params": grafted["active_params"] - base["active_params"],
        "flops_ratio": grafted["flops_per_token"] / base["flops_per_token"],
        "latency": {
            "base_seconds": statistics.median(base_seconds),
            "grafted_seconds": statistics.median(grafted_seconds),
            "ratio": statistics.median(ratios),
            "repeats": repeats,
            "prompts": len(prompts),
            "new_tokens": max_new_tokens,
            "threads": torch.get_num_threads(),
        },
    }


@torch.no_grad()
def _generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], new_tokens: int
) -> float:
    """Seconds to greedily generate exactly `new_tokens` tokens for every prompt (one batch)."""
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    rows = [tokenizer.encode(prompt) for prompt in prompts]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding: every continuation starts at `width`
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    seconds = time.perf_counter() - start
    model.train(was_training)
    if output.shape[1] != width + new_tokens:
        raise CostError(
            f"generation stopped after {output.shape[1] - width} of {new_tokens} tokens"
        )
    return seconds

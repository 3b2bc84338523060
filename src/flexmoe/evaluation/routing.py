"""Routing statistics: how the MoE layers of a model spread tokens over their experts.

FLEx keeps the routers frozen while the shared layers below them change (the reviewers' "routing
drift"), and adds a gated expert beside every block. Measured per MoE layer on a set of batches
(e.g. one client's test data), padding tokens excluded:
- activation counts: how often each expert is among a token's top-k, as the router chose them;
- activation std: the standard deviation over experts of each expert's activation frequency
  (the share of tokens that select it; frequencies sum to top-k). The paper's load-imbalance
  statistic: 0 when every expert is used equally. Population std (ddof=0): the experts are the
  whole population, not a sample;
- routing entropy: the mean per-token entropy of the router's distribution over experts (how
  decisive routing is) and the entropy of the load distribution (counts / total: how evenly the
  layer's work is spread). Both in bits, at most log2(E);
- Jensen-Shannon divergence (bits, in [0, 1]) of a layer's load from a reference load, e.g. the
  base model's on the same batches: how far fine-tuning moved the routing;
- for grafted models, the mean gate activation of each grafted expert: the weight with which it
  enters the block's output, averaged over tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from rich.progress import track
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from flexmoe.flex import find_grafts
from flexmoe.moe import find_moe_layers
from flexmoe.runtime import console


class RoutingStatsError(ValueError):
    """Routing statistics that cannot be computed as asked; the message says why."""


@dataclass
class RoutingProfile:
    """Routing of each MoE layer (in model order) over a set of batches."""

    layer_indices: list[int]
    """Decoder-layer index of each MoE layer (dense layers have no routing and are absent)."""
    top_k: list[int]
    counts: Tensor
    """[L, E] int64: times each expert was among a token's top-k."""
    tokens: Tensor
    """[L] int64: tokens routed (padding excluded); counts[l].sum() == tokens[l] * top_k[l]."""
    token_entropy: Tensor
    """[L] float64: mean over tokens of the entropy (bits) of the router's distribution."""
    gate_means: dict[int, list[float]] = field(default_factory=dict)
    """Layer index -> mean gate activation of each grafted expert (empty without a graft)."""

    @property
    def activation_frequency(self) -> Tensor:
        """[L, E]: share of tokens that select each expert (a row sums to top-k)."""
        return self.counts.double() / self.tokens.clamp(min=1).double()[:, None]

    @property
    def load(self) -> Tensor:
        """[L, E]: each expert's share of the layer's top-k selections (a row sums to 1)."""
        return self.counts.double() / self.counts.sum(-1, keepdim=True).clamp(min=1).double()

    def to_dict(self) -> dict:
        return {
            "layer_indices": self.layer_indices,
            "top_k": self.top_k,
            "counts": self.counts.tolist(),
            "tokens": self.tokens.tolist(),
            "token_entropy_bits": self.token_entropy.tolist(),
            "gate_means": {str(k): v for k, v in self.gate_means.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> RoutingProfile:
        """The profile `to_dict` wrote (e.g. read back from JSON)."""
        return cls(
            layer_indices=list(data["layer_indices"]),
            top_k=list(data["top_k"]),
            counts=torch.tensor(data["counts"], dtype=torch.long),
            tokens=torch.tensor(data["tokens"], dtype=torch.long),
            token_entropy=torch.tensor(data["token_entropy_bits"], dtype=torch.float64),
            gate_means={int(k): list(v) for k, v in data["gate_means"].items()},
        )


def entropy_bits(distribution: Tensor) -> Tensor:
    """Entropy in bits of distributions along the last dim (0 log 0 = 0)."""
    p = distribution.double()
    return -torch.special.xlogy(p, p).sum(-1) / math.log(2)


def js_divergence(p: Sequence[float] | Tensor, q: Sequence[float] | Tensor) -> float:
    """Jensen-Shannon divergence in bits (0: identical, 1: disjoint supports) of two
    distributions; counts are accepted and normalised."""
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    if p.shape != q.shape or p.dim() != 1:
        raise RoutingStatsError(
            f"JS divergence needs two 1-D distributions of the same length, got shapes "
            f"{tuple(p.shape)} and {tuple(q.shape)}"
        )
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise RoutingStatsError("JS divergence needs non-negative weights with a positive sum")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum()
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum()
    return float((kl_pm + kl_qm) / 2 / math.log(2))


@torch.no_grad()
def routing_profile(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor] | Tensor],
    *,
    progress: bool = True,
) -> RoutingProfile:
    """Run `model` (in eval mode) on `batches` and record every MoE layer's routing.

    A batch is a LongTensor of input ids [B, S] or a mapping with "input_ids" and optionally
    "attention_mask" (other keys, e.g. labels, are ignored). Forward hooks on the routers record
    the router's own output (logits, top-k weights, top-k indices), so the counts are exactly
    the experts the model used; hooks on the graft gates record their activations.
    """
    layers = find_moe_layers(model)
    grafts = find_grafts(model)
    counts = [torch.zeros(layer.num_experts, dtype=torch.long) for layer in layers]
    tokens = [0] * len(layers)
    entropy_sums = [0.0] * len(layers)
    gate_sums = {index: [0.0] * len(g.grafted) for index, g in grafts.items()}
    gate_tokens = dict.fromkeys(grafts, 0)
    current: dict[str, Tensor] = {}  # the flattened attention mask of the batch being run

    def record_router(position: int, scoring: str, output) -> None:
        logits, _, top_index = output
        keep = _checked_mask(current["mask"], logits.shape[0], "router")
        logits, top_index = logits[keep].double(), top_index[keep]
        counts[position] += torch.bincount(
            top_index.reshape(-1).cpu(), minlength=counts[position].numel()
        )
        tokens[position] += logits.shape[0]
        if scoring == "sigmoid":  # independent scores per expert: normalise to a distribution
            scores = torch.sigmoid(logits)
            distribution = scores / scores.sum(-1, keepdim=True)
        else:
            distribution = torch.softmax(logits, dim=-1)
        entropy_sums[position] += float(entropy_bits(distribution).sum())

    def record_gate(layer_index: int, graft_position: int, output: Tensor) -> None:
        values = output.reshape(-1)
        keep = _checked_mask(current["mask"], values.shape[0], "graft gate")
        gate_sums[layer_index][graft_position] += float(values[keep].double().sum())
        if graft_position == 0:
            gate_tokens[layer_index] += int(keep.sum())

    handles = []
    for position, layer in enumerate(layers):
        scoring = layer.routing.scoring
        handles.append(
            layer.router.register_forward_hook(
                lambda _m, _i, out, p=position, s=scoring: record_router(p, s, out)
            )
        )
    for index, graft in grafts.items():
        for i, gate in enumerate(graft.gates or []):
            handles.append(
                gate.register_forward_hook(
                    lambda _m, _i, out, li=index, gi=i: record_gate(li, gi, out)
                )
            )
    was_training = model.training
    model.eval()  # PhiMoE routes randomly and Mixtral jitters its inputs in train mode
    device = next(model.parameters()).device
    try:
        for batch in track(
            batches, description="routing", console=console, disable=not progress, transient=True
        ):
            input_ids, attention_mask = _inputs(batch)
            current["mask"] = attention_mask.reshape(-1).bool().to(device)
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    token_counts = torch.tensor(tokens, dtype=torch.long)
    if int(token_counts.min()) == 0:
        raise RoutingStatsError("no tokens were routed: pass at least one non-empty batch")
    return RoutingProfile(
        layer_indices=[layer.layer_index for layer in layers],
        top_k=[layer.top_k for layer in layers],
        counts=torch.stack(counts),
        tokens=token_counts,
        token_entropy=torch.tensor(entropy_sums, dtype=torch.float64) / token_counts,
        gate_means={
            index: _gate_means(graft, gate_sums[index], gate_tokens[index])
            for index, graft in grafts.items()
        },
    )


def prompt_batches(
    prompts: Sequence[Sequence[int]], tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> list[dict[str, Tensor]]:
    """Token-id prompts as right-padded batches with attention masks, ready for
    `routing_profile` (which leaves the padding out of every statistic)."""
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    batches = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def routing_summary(profile: RoutingProfile, reference: RoutingProfile | None = None) -> dict:
    """Per-layer statistics (see the module docstring) and their mean over layers, JSON-able.

    With a `reference` (e.g. the base model's profile on the same batches), each layer also gets
    the JS divergence of its load from the reference layer's load.
    """
    if reference is not None and (
        reference.layer_indices != profile.layer_indices
        or reference.counts.shape != profile.counts.shape
    ):
        raise RoutingStatsError(
            f"the reference profile has MoE layers {reference.layer_indices} with "
            f"{reference.counts.shape[-1]} experts, this one {profile.layer_indices} with "
            f"{profile.counts.shape[-1]}: profile the same architecture"
        )
    activation_std = profile.activation_frequency.std(dim=-1, correction=0)
    load_entropy = entropy_bits(profile.load)
    rows = []
    for position, layer_index in enumerate(profile.layer_indices):
        row = {
            "layer": layer_index,
            "tokens": int(profile.tokens[position]),
            "activation_std": float(activation_std[position]),
            "token_entropy_bits": float(profile.token_entropy[position]),
            "load_entropy_bits": float(load_entropy[position]),
            "max_entropy_bits": math.log2(profile.counts.shape[-1]),
        }
        if reference is not None:
            row["js_from_reference_bits"] = js_divergence(
                profile.counts[position], reference.counts[position]
            )
        if layer_index in profile.gate_means:
            row["gate_mean"] = sum(profile.gate_means[layer_index]) / len(
                profile.gate_means[layer_index]
            )
        rows.append(row)
    averaged = [key for key in rows[0] if key not in ("layer", "tokens", "max_entropy_bits")]
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in averaged}
    return {"layers": rows, "mean": mean}


def _inputs(batch: Mapping[str, Tensor] | Tensor) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of a batch; an all-ones mask when none is given."""
    if isinstance(batch, Tensor):
        input_ids, attention_mask = batch, None
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise RoutingStatsError(
            f"a batch must be a tensor of input ids or a mapping with 'input_ids', got "
            f"{type(batch).__name__}"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask.reshape(input_ids.shape)


def _checked_mask(mask: Tensor, rows: int, where: str) -> Tensor:
    """The batch's token mask, after checking that a hooked module saw one row per position."""
    if mask.numel() != rows:
        raise RoutingStatsError(
            f"the {where} saw {rows} tokens for a batch of {mask.numel()} tokens: flexmoe "
            "expects MoE blocks to route every position of the batch once"
        )
    return mask


def _gate_means(graft: nn.Module, sums: list[float], token_count: int) -> list[float]:
    """Mean weight of each grafted expert: the forced value, 1.0 without gates, else measured."""
    if graft.forced_gate is not None:
        return [float(graft.forced_gate)] * len(sums)
    if graft.gates is None:
        return [1.0] * len(sums)
    return [total / max(token_count, 1) for total in sums]

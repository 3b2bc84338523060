"""What a MoE router computes, as data: scoring, top-k, groups, normalisation, scaling.

Routers in transformers return only the k chosen experts and their weights. Expert selection in
FLEx needs more: the weight the block would give to every expert when only some experts are
allowed ("mask the others' logits to -inf, then the layer's own softmax/top-k/normalisation").
`RoutingSpec` re-states the routing function so it can be re-run under such a mask;
`RoutingSpec.from_router` reads it from the router's attributes, and the adapter checks it on a
probe batch against the router itself, so a misread router is refused instead of mis-scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Scoring = Literal["softmax", "sigmoid", "sparsemixer"]
GroupScore = Literal["max", "top2_sum"]


@dataclass(frozen=True)
class RoutingSpec:
    """The routing function of one MoE block.

    - `scoring`: "softmax" over all experts (Qwen, OLMoE, Mixtral, DeepSeek-V2, and GraniteMoE /
      GPT-OSS, whose "top-k on logits, then softmax over the k" is the same function as softmax,
      top-k, renormalise); "sigmoid" per expert (DeepSeek-V3); "sparsemixer" (PhiMoE, eval mode).
    - `correction_bias`: added to the scores for choosing experts only, never to the weights.
    - `n_group`/`topk_group`: group-limited top-k: experts come in `n_group` equal groups, only the
      `topk_group` best groups (by `group_score`) compete for the top-k.
    - `renormalize`: divide the k chosen weights by their sum; then multiply by
      `routed_scaling_factor`.
    - `jitter_eps`: the sparsemixer's relative threshold for experts competing with the best.
    """

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    renormalize: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "max"
    correction_bias: Tensor | None = None
    jitter_eps: float = 0.0

    @classmethod
    def from_router(cls, router: nn.Module) -> RoutingSpec:
        """Read the spec from a transformers router's attributes (the ones its forward uses)."""
        num_experts, top_k = int(router.num_experts), int(router.top_k)
        scaling = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
        n_group = int(getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1)
        topk_group = int(getattr(router, "topk_group", None) or 1)
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek-V3 style: sigmoid, biased choice, top-2-sum groups
            return cls(
                num_experts,
                top_k,
                "sigmoid",
                renormalize=bool(getattr(router, "norm_topk_prob", True)),
                routed_scaling_factor=scaling,
                n_group=n_group,
                topk_group=topk_group,
                group_score="top2_sum",
                correction_bias=bias,
            )
        if hasattr(router, "topk_method"):  # DeepSeek-V2 style: never renormalised
            grouped = router.topk_method == "group_limited_greedy"
            return cls(
                num_experts,
                top_k,
                "softmax",
                routed_scaling_factor=scaling,
                n_group=n_group if grouped else 1,
                topk_group=topk_group if grouped else 1,
            )
        if hasattr(router, "router_jitter_noise"):  # PhiMoE: sparsemixer, always 2 experts
            return cls(num_experts, 2, "sparsemixer", jitter_eps=float(router.router_jitter_noise))
        # Qwen/OLMoE say whether they renormalise; Mixtral, GraniteMoE and GPT-OSS always do.
        renormalize = bool(getattr(router, "norm_topk_prob", True))
        return cls(num_experts, top_k, "softmax", renormalize, routed_scaling_factor=scaling)

    def summary(self) -> str:
        """One line for CLI output and reports, e.g. 'softmax top-4, not renormalised'."""
        parts = [f"{self.scoring} top-{self.top_k}"]
        if self.scoring != "sparsemixer":
            parts.append("renormalised" if self.renormalize else "not renormalised")
        if self.n_group > 1:
            parts.append(f"{self.topk_group} of {self.n_group} groups ({self.group_score})")
        if self.correction_bias is not None:
            parts.append("selection bias")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"x{self.routed_scaling_factor:g}")
        return ", ".join(parts)

    def dense_weights(self, logits: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Per-token weight of every expert in the block's mixture, fp32 [T, E] (0 = not chosen).

        `allowed` ([E] or [T, E] bool) restricts routing to some experts: the others are removed
        before top-k and normalisation (logits -inf for softmax, scores excluded for sigmoid), so
        with one allowed expert a softmax router gives it weight 1 (times any scaling). When fewer
        than k experts are allowed, only those get weight; a token with none allowed gets zeros.
        """
        allowed = self._allowed_mask(allowed, logits)
        if self.scoring == "sparsemixer":  # in the logits' dtype, like PhiMoE's thresholds
            return self._sparsemixer(logits, allowed).float()
        logits = logits.float()
        if self.scoring == "softmax":
            scores = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        else:
            scores = logits.sigmoid()
        choice = scores if self.correction_bias is None else scores + self.correction_bias.float()
        choice = choice.masked_fill(~allowed, float("-inf"))
        if self.n_group > 1:
            choice = self._limit_to_best_groups(choice)
        top_choice, top_index = choice.topk(self.top_k, dim=-1)
        weights = scores.gather(-1, top_index) * top_choice.isfinite()
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return torch.zeros_like(scores).scatter_add_(-1, top_index, weights)

    def _allowed_mask(self, allowed: Tensor | None, logits: Tensor) -> Tensor:
        if logits.dim() != 2 or logits.shape[-1] != self.num_experts:
            raise ValueError(
                f"router logits must be [tokens, {self.num_experts}], got {tuple(logits.shape)}"
            )
        if allowed is None:
            return torch.ones_like(logits, dtype=torch.bool)
        if allowed.dtype != torch.bool or allowed.shape[-1] != self.num_experts:
            raise ValueError(
                f"`allowed` must be a bool mask of shape [{self.num_experts}] or "
                f"[tokens, {self.num_experts}], got {allowed.dtype} {tuple(allowed.shape)}"
            )
        return allowed.to(logits.device).expand_as(logits)

    def _limit_to_best_groups(self, choice: Tensor) -> Tensor:
        """Keep only the experts of each token's `topk_group` best groups (others -> -inf)."""
        tokens = choice.shape[0]
        grouped = choice.view(tokens, self.n_group, self.num_experts // self.n_group)
        if self.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            # Sum of the two best choice scores; a group with one allowed expert is ranked by that
            # expert alone (with no mask every score is finite and this is DeepSeek-V3's rule).
            top2 = grouped.topk(2, dim=-1).values
            group_scores = top2.where(top2.isfinite(), 0.0).sum(dim=-1)
            group_scores = group_scores.masked_fill(~top2.isfinite().any(dim=-1), float("-inf"))
        best_groups = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, best_groups, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape_as(choice)
        return choice.masked_fill(~keep, float("-inf"))

    def _sparsemixer(self, logits: Tensor, allowed: Tensor) -> Tensor:
        """PhiMoE's sparsemixer in eval mode (transformers' `sparsemixer(training=False)`).

        Pick the best remaining expert; its weight is its softmax among the remaining experts whose
        logit is within a relative `2 * jitter_eps` of it; remove it; repeat.
        """
        scores = logits.masked_fill(~allowed, float("-inf"))
        remaining = scores.clone()
        dense = torch.zeros_like(scores)
        for _ in range(self.top_k):
            best, best_index = remaining.max(dim=-1, keepdim=True)
            factor = scores.abs().clamp(min=best)
            too_far = ((best - scores) / factor) > 2 * self.jitter_eps
            gates = remaining.masked_fill(too_far, float("-inf")).softmax(dim=-1)
            weight = gates.gather(-1, best_index).where(best.isfinite(), 0.0)
            dense.scatter_add_(-1, best_index, weight)
            remaining = remaining.scatter(-1, best_index, float("-inf"))
        return dense

"""Choose, per MoE layer, the expert(s) a client grafts: FLEx's one-shot selection on local data.

"reconstruction" (the paper, after Lu et al. 2024): for every candidate set S of experts, Z_S is
the block's output when its router may only pick experts in S (the others are removed before the
block's own top-k and normalisation, see `RoutingSpec.dense_weights`); S is scored by
||Z - Z_S||_F over all calibration tokens (padding excluded) and the argmin is kept. The norm is
taken over all tokens at once, so the score does not depend on how the tokens were batched.

Why it is cheap: Z - Z_S only involves the routed experts (a shared expert adds the same term to
both, and GraniteMoeShared's lives outside the block), and every term is a routing weight times
an expert's output. So each block's input is captured once per batch by a hook during one model
forward, every expert's output is computed once, and all candidate sets are scored from those
outputs; nothing is rerun per candidate. `scoring="brute-force"` is the slow definition that the
tests and the benchmark check this against: it reruns the real block per candidate with its
router's logits masked.

r > 1: every set of r experts is scored when there are at most `EXHAUSTIVE_LIMIT` of them,
otherwise sets grow greedily (best single expert, then the best expert to add, ...), one model
pass per step. Each `LayerSelection` records which search ran. "random" (seeded) and
"most-routed" (ESFT-style: the experts the router picks most often on the local data) are the
ablations.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal
from unittest import mock

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn

from flexmoe.flex.config import FlexConfig
from flexmoe.flex.errors import FlexError
from flexmoe.moe import SUPPORTED_FAMILIES, MoELayer, find_moe_layers
from flexmoe.moe.adapter import PERSONAL_ATTRIBUTE
from flexmoe.runtime import console

EXHAUSTIVE_LIMIT = 2000
"""Largest number of candidate sets scored exhaustively for r > 1 (C(60, 2) = 1770 fits)."""

_CHUNK_ELEMENTS = 1 << 26
"""Bound on the elements of the largest scoring tensor (256 MB in fp32): tokens, and candidate
sets, are processed in chunks so 60-expert layers fit in memory."""

Scoring = Literal["vectorised", "brute-force"]
SquaredErrors = Callable[[MoELayer, Tensor, Tensor], Tensor]


@dataclass
class LayerSelection:
    """The experts chosen for one MoE layer and the evidence for the choice."""

    layer_index: int
    selected: list[int]
    strategy: str
    search: str
    """"exhaustive" (every candidate set scored), "greedy" (sets grown one expert at a time),
    "top-r" (most-routed) or "random"."""
    candidates: list[list[int]]
    """The expert sets that were scored, in order (for r = 1: [[0], [1], ...], one per expert)."""
    scores: list[float]
    """One score per candidate: the reconstruction error ||Z - Z_S||_F (lower is better) or the
    routing frequency (higher is better), see `score_name`; empty for "random"."""
    score_name: str
    tokens: int
    """Calibration tokens the scores were computed on (padding excluded)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerSelection:
        return cls(**data)


@dataclass
class _Batch:
    input_ids: Tensor
    attention_mask: Tensor


def select_experts(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    cfg: FlexConfig,
    *,
    scoring: Scoring = "vectorised",
) -> dict[int, LayerSelection]:
    """Select `cfg.r` experts per MoE layer on calibration batches of a client's local data.

    `batches` yields dicts with `input_ids` [B, S] and optionally `attention_mask` [B, S]; the
    first `cfg.calibration_samples` sequences are used, each cut to `cfg.calibration_max_length`
    tokens. The model runs in eval mode without gradients (PhiMoE routes randomly and Mixtral
    jitters its inputs in train mode); its train/eval mode is restored afterwards.
    """
    if any(getattr(module, PERSONAL_ATTRIBUTE, False) for module in model.modules()):
        raise FlexError(
            "the model is already grafted: select experts on the base model (remove_graft(model) "
            "first), since a graft changes the inputs of the layers after it"
        )
    layers = graftable_layers(model)
    too_few = [layer for layer in layers if layer.num_experts < cfg.r]
    if too_few:
        raise FlexError(
            f"cannot graft r={cfg.r} experts: layer {too_few[0].layer_index} has only "
            f"{too_few[0].num_experts} experts; lower flex.r"
        )
    if cfg.strategy == "random":
        return _select_random(layers, cfg)
    device = next(model.parameters()).device
    calibration = _calibration_batches(batches, cfg, device)
    with _inference(model):
        if cfg.strategy == "most-routed":
            return _select_most_routed(model, layers, calibration, cfg.r)
        squared_errors = _squared_errors if scoring == "vectorised" else _brute_force_squared_errors
        return _select_by_reconstruction(model, layers, calibration, cfg.r, squared_errors)


def graftable_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers (`find_moe_layers`), refused if an expert copy cannot stand beside
    the block: experts that work in a latent space behind projections inside the block
    (NemotronH's `moe_latent_size`, MuseSpark's post-expert norm) do not compute on the block's
    input, so neither scoring nor a graft on that input would mean what FLEx intends."""
    layers = find_moe_layers(model)
    for layer in layers:
        block_width = layer.router.weight.shape[-1]
        if layer.hidden_size != block_width or getattr(
            layer.experts, "has_post_expert_norm", False
        ):
            raise FlexError(
                f"the experts of {layer.path} work in a latent space (width {layer.hidden_size}, "
                f"block input {block_width}) or behind a post-expert norm; FLEx grafts experts "
                f"that compute on the block's input, as in {', '.join(SUPPORTED_FAMILIES)}"
            )
    return layers


def _select_random(layers: list[MoELayer], cfg: FlexConfig) -> dict[int, LayerSelection]:
    generator = torch.Generator().manual_seed(cfg.seed)
    return {
        layer.layer_index: LayerSelection(
            layer_index=layer.layer_index,
            selected=torch.randperm(layer.num_experts, generator=generator)[: cfg.r].tolist(),
            strategy="random",
            search="random",
            candidates=[],
            scores=[],
            score_name="none",
            tokens=0,
        )
        for layer in layers
    }


def _select_most_routed(
    model: nn.Module, layers: list[MoELayer], calibration: list[_Batch], r: int
) -> dict[int, LayerSelection]:
    """The r experts routed to most often (ties: larger summed routing weight, lower index)."""
    counts = {
        layer.layer_index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers
    }
    weight_sums = {index: torch.zeros_like(count) for index, count in counts.items()}

    def count_routes(layer: MoELayer, x2d: Tensor) -> None:
        weights = layer.dense_weights(x2d)
        counts[layer.layer_index] += (weights > 0).sum(dim=0).double().cpu()
        weight_sums[layer.layer_index] += weights.sum(dim=0).double().cpu()

    tokens = _run_calibration(model, layers, calibration, count_routes, "routing statistics")
    selections = {}
    for layer in layers:
        frequency = (counts[layer.layer_index] / tokens).tolist()
        summed = weight_sums[layer.layer_index].tolist()
        ranking = sorted(range(layer.num_experts), key=lambda e: (-frequency[e], -summed[e], e))
        selections[layer.layer_index] = LayerSelection(
            layer_index=layer.layer_index,
            selected=ranking[:r],
            strategy="most-routed",
            search="top-r",
            candidates=[[e] for e in range(layer.num_experts)],
            scores=frequency,
            score_name="routing_frequency",
            tokens=tokens,
        )
    return selections


def _select_by_reconstruction(
    model: nn.Module,
    layers: list[MoELayer],
    calibration: list[_Batch],
    r: int,
    squared_errors: SquaredErrors,
) -> dict[int, LayerSelection]:
    exhaustive = {
        layer.layer_index: math.comb(layer.num_experts, r) <= EXHAUSTIVE_LIMIT for layer in layers
    }
    chosen: dict[int, list[int]] = {layer.layer_index: [] for layer in layers}
    scored: dict[int, tuple[list[list[int]], list[float]]] = {i: ([], []) for i in chosen}
    tokens = 0
    steps = 1 if all(exhaustive.values()) else r
    for step in range(steps):
        candidates: dict[int, Tensor] = {}
        for layer in layers:
            index = layer.layer_index
            if exhaustive[index] and step == 0:
                sets = itertools.combinations(range(layer.num_experts), r)
                candidates[index] = torch.tensor(list(sets), dtype=torch.long)
            elif not exhaustive[index]:
                grown = [
                    [*chosen[index], e] for e in range(layer.num_experts) if e not in chosen[index]
                ]
                candidates[index] = torch.tensor(grown, dtype=torch.long)
        scoring_layers = [layer for layer in layers if layer.layer_index in candidates]
        description = "expert selection" if steps == 1 else f"expert selection, step {step + 1}/{r}"
        totals, tokens = _score_candidates(
            model, scoring_layers, calibration, candidates, squared_errors, description
        )
        for index, sets in candidates.items():
            errors = totals[index].clamp(min=0).sqrt()  # the expansion can round below 0
            chosen[index] = sets[int(errors.argmin())].tolist()
            scored[index][0].extend(sets.tolist())
            scored[index][1].extend(errors.tolist())
    return {
        index: LayerSelection(
            layer_index=index,
            selected=chosen[index],
            strategy="reconstruction",
            search="exhaustive" if exhaustive[index] else "greedy",
            candidates=scored[index][0],
            scores=scored[index][1],
            score_name="reconstruction_error",
            tokens=tokens,
        )
        for index in chosen
    }


def _score_candidates(
    model: nn.Module,
    layers: list[MoELayer],
    calibration: list[_Batch],
    candidates: dict[int, Tensor],
    squared_errors: SquaredErrors,
    description: str,
) -> tuple[dict[int, Tensor], int]:
    """Summed squared reconstruction error of every candidate set of every layer, in one pass."""
    totals = {
        index: torch.zeros(len(sets), dtype=torch.float64) for index, sets in candidates.items()
    }

    def accumulate(layer: MoELayer, x2d: Tensor) -> None:
        index = layer.layer_index
        totals[index] += squared_errors(layer, x2d, candidates[index]).cpu()

    tokens = _run_calibration(model, layers, calibration, accumulate, description)
    return totals, tokens


def _squared_errors(layer: MoELayer, x2d: Tensor, sets: Tensor) -> Tensor:
    """sum_t ||Z_t - Z_S,t||^2 for every candidate set S (rows of `sets` [N, r]) -> float64 [N].

    Z - Z_S = R - sum_{j in S} w^S_j E_j, with R = sum_e w_e E_e the block's routed output, E_e
    the experts' outputs and w^S the routing weights when only S is allowed. Expanded per token,
        ||Z - Z_S||^2 = ||R||^2 - 2 sum_j w^S_j <R, E_j> + sum_{j,l} w^S_j w^S_l <E_j, E_l>,
    so after the experts' outputs (computed once per token chunk, the dominant cost) each set
    costs O(r^2) per token. The per-token terms are combined in float64.
    """
    routing = layer.routing
    num_experts = layer.num_experts
    per_token = num_experts * (layer.hidden_size + 2 * layer.intermediate_size)
    sets = sets.to(x2d.device)
    num_sets, r = sets.shape
    total = torch.zeros(num_sets, dtype=torch.float64, device=x2d.device)
    for x in x2d.split(max(1, _CHUNK_ELEMENTS // per_token)):
        tokens = x.shape[0]
        logits = layer.router_logits(x)
        outputs = layer.expert_forward(x).float()  # [E, T, H]
        routed = torch.einsum("te,eth->th", routing.dense_weights(logits), outputs)
        routed_squared = routed.pow(2).sum(dim=-1).double().sum()
        dots = torch.einsum("th,eth->et", routed, outputs).double()  # [E, T]
        if r == 1:  # only <E_e, E_e> is needed
            gram = outputs.pow(2).sum(dim=-1).double()[:, None, :]  # [E, 1, T]
        else:
            gram = torch.einsum("ath,bth->abt", outputs, outputs).double()  # [E, E, T]
        set_chunk = max(1, _CHUNK_ELEMENTS // (tokens * max(num_experts, r * r)))
        for start in range(0, num_sets, set_chunk):
            members = sets[start : start + set_chunk]  # [n, r]
            n = members.shape[0]
            allowed = torch.zeros(n, num_experts, dtype=torch.bool, device=x.device)
            allowed.scatter_(1, members, True)
            restricted_weights = routing.dense_weights(
                logits.repeat(n, 1), allowed.repeat_interleave(tokens, dim=0)
            ).view(n, tokens, num_experts)
            weights = restricted_weights.gather(2, members[:, None, :].expand(n, tokens, r))
            weights = weights.double()  # [n, T, r]
            if r == 1:
                member_gram = gram[members[:, 0]][:, None]  # [n, 1, 1, T]
            else:
                member_gram = gram[members[:, :, None], members[:, None, :]]  # [n, r, r, T]
            cross = torch.einsum("ntr,nrt->n", weights, dots[members])
            own = torch.einsum("ntr,ntq,nrqt->n", weights, weights, member_gram)
            total[start : start + n] += routed_squared - 2 * cross + own
    return total


def _brute_force_squared_errors(layer: MoELayer, x2d: Tensor, sets: Tensor) -> Tensor:
    """The definition `_squared_errors` must reproduce: rerun the real block once per candidate
    set with its router's logits masked to -inf outside the set (slow; for tests and benchmarks).
    """
    full = _block_output(layer.block, x2d)
    errors = []
    for members in sets.tolist():
        allowed = torch.zeros(layer.num_experts, dtype=torch.bool, device=x2d.device)
        allowed[members] = True
        with _router_restricted_to(layer.router, allowed):
            restricted = _block_output(layer.block, x2d)
        errors.append((full - restricted).double().pow(2).sum())
    return torch.stack(errors)


def _block_output(block: nn.Module, x2d: Tensor) -> Tensor:
    output = block(x2d.unsqueeze(0))
    output = output[0] if isinstance(output, tuple) else output  # GPT-OSS: (hidden, scores)
    return output.reshape(x2d.shape)


@contextmanager
def _router_restricted_to(router: nn.Module, allowed: Tensor) -> Iterator[None]:
    """Inside the router's own forward, its logits come out -inf for experts not in `allowed`.

    A router with a selection bias (DeepSeek-V3: sigmoid scores + `e_score_correction_bias` for
    choosing) would still let masked experts compete through their bias (sigmoid(-inf) = 0, plus
    bias), crowding out the allowed expert's group; their bias is pushed far down too, so they are
    out of the choice, as `RoutingSpec.dense_weights` defines restriction.
    """
    real_linear = F.linear

    def masked_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        logits = real_linear(x, weight, bias)
        if logits.shape[-1] != allowed.numel():
            return logits
        return logits.masked_fill(~allowed, float("-inf"))

    original_forward = router.forward

    def restricted_forward(*args, **kwargs):
        with mock.patch.object(F, "linear", masked_linear):
            return original_forward(*args, **kwargs)

    selection_bias = getattr(router, "e_score_correction_bias", None)
    saved_bias = None if selection_bias is None else selection_bias.clone()
    router.forward = restricted_forward
    try:
        if selection_bias is not None:
            selection_bias.masked_fill_(~allowed, -1e3)
        yield
    finally:
        del router.forward
        if selection_bias is not None:
            selection_bias.copy_(saved_bias)


def _run_calibration(
    model: nn.Module,
    layers: list[MoELayer],
    calibration: list[_Batch],
    consume: Callable[[MoELayer, Tensor], None],
    description: str,
) -> int:
    """One model forward per batch; `consume(layer, x2d)` receives each block's input tokens
    (padding removed) as the forward reaches the block. Returns the number of tokens consumed."""
    mask = torch.ones(0, 0, dtype=torch.bool)  # the current batch's attention mask
    busy = False  # the brute-force scorer reruns the block inside the hook: ignore those calls

    def capture(layer: MoELayer) -> Callable:
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            nonlocal busy
            if busy:
                return
            hidden = args[0] if args else next(iter(kwargs.values()))
            if hidden.shape[:2] != mask.shape:
                raise FlexError(
                    f"block {layer.path} received hidden states of shape {tuple(hidden.shape)}, "
                    f"which do not line up with the attention mask {tuple(mask.shape)}"
                )
            busy = True
            try:
                consume(layer, hidden[mask])
            finally:
                busy = False

        return hook

    handles = [
        layer.block.register_forward_pre_hook(capture(layer), with_kwargs=True) for layer in layers
    ]
    tokens = 0
    try:
        with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task(description, total=len(calibration))
            for batch in calibration:
                mask = batch.attention_mask.bool()
                model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                )
                tokens += int(batch.attention_mask.sum())
                progress.advance(task)
    finally:
        for handle in handles:
            handle.remove()
    return tokens


def _calibration_batches(
    batches: Iterable[Mapping[str, Tensor]], cfg: FlexConfig, device: torch.device
) -> list[_Batch]:
    """The first `calibration_samples` sequences, cut to `calibration_max_length` tokens."""
    selected: list[_Batch] = []
    sequences = truncated = 0
    for batch in batches:
        if sequences >= cfg.calibration_samples:
            break
        if "input_ids" not in batch:
            raise FlexError(
                f"calibration batches must hold `input_ids` (and `attention_mask`); got keys "
                f"{sorted(batch)}"
            )
        input_ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask)
        if input_ids.dim() != 2 or mask.shape != input_ids.shape:
            raise FlexError(
                f"calibration `input_ids` must be [batch, tokens] with an attention_mask of the "
                f"same shape; got {tuple(input_ids.shape)} and {tuple(mask.shape)}"
            )
        take = cfg.calibration_samples - sequences
        input_ids, mask = input_ids[:take], mask[:take]
        limit = cfg.calibration_max_length
        truncated += int((mask[:, limit:].sum(dim=1) > 0).sum())
        selected.append(_Batch(input_ids[:, :limit].to(device), mask[:, :limit].to(device)))
        sequences += input_ids.shape[0]
    if truncated:
        console.print(
            f"[yellow]warning:[/] {truncated} of {sequences} calibration sequences were cut to "
            f"{cfg.calibration_max_length} tokens (flex.calibration_max_length)"
        )
    if sum(int(batch.attention_mask.sum()) for batch in selected) == 0:
        raise FlexError(
            "expert selection got no calibration tokens: pass batches of the client's local "
            "data with at least one non-padding token"
        )
    return selected


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """eval() and no_grad for the duration, then the model's previous train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)

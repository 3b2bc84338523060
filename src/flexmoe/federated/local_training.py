"""A client's local training: a few optimiser steps on its own data (framework-free, no Flower).

Deterministic by construction: the batches of client c in round r are drawn with a generator
seeded by (seed, round, client), so a resumed run replays exactly the steps an uninterrupted
run would take.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from flexmoe.data.prompting import EncodedExample, collate


def cosine_lr(server_round: int, rounds: int, lr: float, min_lr: float) -> float:
    """The paper's schedule: the client lr decays with a cosine across rounds (1-based round)."""
    progress = (server_round - 1) / max(rounds - 1, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def round_seed(seed: int, server_round: int, client: int) -> int:
    """A seed for client `client` in round `server_round`, independent of process and order."""
    digest = hashlib.sha256(f"{seed}:{server_round}:{client}".encode()).hexdigest()
    return int(digest[:15], 16)


def draw_batches(
    examples: Sequence[EncodedExample],
    steps: int,
    batch_size: int,
    seed: int,
    pad_token_id: int,
) -> list[dict[str, torch.Tensor]]:
    """`steps` batches sampled without replacement within an epoch (reshuffled per pass)."""
    if not examples:
        raise ValueError(
            "this client has no training examples (all were skipped, e.g. as longer than "
            "train.max_length): raise train.max_length or check the client's data"
        )
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(examples), generator=generator).tolist()
    return [
        collate([examples[i] for i in order[s * batch_size : (s + 1) * batch_size]], pad_token_id)
        for s in range(steps)
    ]


GradientHook = Callable[[dict[str, torch.nn.Parameter]], None]
"""Called after backward and before the optimiser step (SCAFFOLD's gradient correction)."""


def train_local(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    prox_mu: float = 0.0,
    gradient_hook: GradientHook | None = None,
) -> float:
    """Run one optimiser step per batch on `params` (AdamW, fresh each round as in the paper's code).

    `prox_mu > 0` adds FedProx's (mu/2)||w - w_global||^2 with w_global = the values at entry.
    Returns the mean language-modelling loss (response tokens only) over the steps.
    """
    device = next(model.parameters()).device
    anchors = {n: p.detach().clone() for n, p in params.items()} if prox_mu > 0 else {}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        losses.append(loss.item())
        if prox_mu > 0:
            prox = sum(((p - anchors[n]) ** 2).sum() for n, p in params.items())
            loss = loss + 0.5 * prox_mu * prox
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if gradient_hook is not None:
            gradient_hook(params)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
        optimizer.step()
    model.eval()
    return sum(losses) / len(losses)

"""Routing statistics: hand-made routing tables give hand-computed values; on tiny models the
counts are the routers' own top-k choices over exactly the non-padding tokens."""

import math

import pytest
import torch
from tiny_models import FAMILIES, build_tiny

from flexmoe.evaluation.routing import (
    RoutingProfile,
    RoutingStatsError,
    entropy_bits,
    js_divergence,
    routing_profile,
    routing_summary,
)
from flexmoe.flex import FlexConfig, force_gate_output, graft, select_experts
from flexmoe.moe import find_moe_layers

INPUT_IDS = torch.randint(3, 160, (2, 12), generator=torch.Generator().manual_seed(0))


def hand_profile(counts, tokens):
    counts = torch.tensor(counts)
    load = counts.double() / counts.sum(-1, keepdim=True)
    return RoutingProfile(
        layer_indices=list(range(len(counts))),
        top_k=[2] * len(counts),
        counts=counts,
        tokens=torch.tensor(tokens),
        token_entropy=entropy_bits(load),  # any value; checked to pass through
    )


def test_statistics_of_a_hand_made_routing_table():
    # 4 tokens, top-2, 4 experts. Layer 0: expert 0 chosen by 6 of the 8 slots... per token:
    # frequencies 6/4, 2/4, 0, 0 = 1.5, .5, 0, 0 (sum = top-k); mean .5, deviations 1, 0, -.5,
    # -.5: variance (1 + 0 + .25 + .25) / 4 = .375. Layer 1: perfectly balanced.
    profile = hand_profile([[6, 2, 0, 0], [2, 2, 2, 2]], [4, 4])
    reference = hand_profile([[2, 2, 2, 2], [2, 2, 2, 2]], [4, 4])
    summary = routing_summary(profile, reference)
    first, second = summary["layers"]
    assert first["activation_std"] == pytest.approx(math.sqrt(0.375))
    assert second["activation_std"] == 0
    # load .75/.25: -(.75 log2 .75 + .25 log2 .25) = .811278...; uniform over 4: 2 bits
    assert first["load_entropy_bits"] == pytest.approx(0.8112781245)
    assert second["load_entropy_bits"] == pytest.approx(2.0) == second["max_entropy_bits"]
    # JS(p=[.75,.25,0,0], q=uniform): m = [.5,.25,.125,.125];
    # KL(p||m) = .75 log2 1.5 = .438722; KL(q||m) = .25(-1 + 0 + 1 + 1) = .25; JS = .344361
    assert first["js_from_reference_bits"] == pytest.approx((0.75 * math.log2(1.5) + 0.25) / 2)
    assert second["js_from_reference_bits"] == 0
    assert summary["mean"]["activation_std"] == pytest.approx(math.sqrt(0.375) / 2)
    assert summary["mean"]["token_entropy_bits"] == pytest.approx((0.8112781245 + 2) / 2)


def test_js_divergence_bounds_and_errors():
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: the maximum, 1 bit
    assert js_divergence([3, 1], [30, 10]) == pytest.approx(0.0)  # counts are normalised
    with pytest.raises(RoutingStatsError, match="same length"):
        js_divergence([1, 0], [1, 0, 0])
    with pytest.raises(RoutingStatsError, match="non-negative"):
        js_divergence([0, 0], [1, 0])


def test_a_reference_of_another_shape_is_refused():
    with pytest.raises(RoutingStatsError, match="same architecture"):
        routing_summary(hand_profile([[1, 1]], [1]), hand_profile([[1, 1], [1, 1]], [1, 1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_are_top_k_per_non_padding_token(family):
    model = build_tiny(family, seed=0)
    mask = torch.ones_like(INPUT_IDS)
    mask[1, 9:] = 0  # three padding positions in the second row
    profile = routing_profile(
        model, [{"input_ids": INPUT_IDS, "attention_mask": mask}], progress=False
    )
    layers = find_moe_layers(model)
    assert profile.layer_indices == [layer.layer_index for layer in layers]
    assert profile.tokens.tolist() == [21] * len(layers)
    assert profile.counts.sum(-1).tolist() == [21 * layer.top_k for layer in layers]
    assert bool((profile.token_entropy > 0).all())
    assert bool((profile.token_entropy <= math.log2(layers[0].num_experts) + 1e-9).all())


def test_counts_and_entropy_match_the_router_on_the_block_input():
    model = build_tiny("qwen3_moe", seed=0)
    layer = find_moe_layers(model)[0]
    captured = []
    handle = layer.block.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    profile = routing_profile(model, [INPUT_IDS], progress=False)
    handle.remove()
    x = captured[0].reshape(-1, 32)
    with torch.no_grad():
        weights = layer.dense_weights(x)
        probabilities = torch.softmax(layer.router_logits(x).double(), -1)
    assert profile.counts[0].tolist() == (weights > 0).sum(0).tolist()
    assert float(profile.token_entropy[0]) == pytest.approx(
        float(entropy_bits(probabilities).mean())
    )


def test_padding_does_not_change_the_routing_of_real_tokens():
    model = build_tiny("olmoe", seed=0)
    alone = routing_profile(model, [INPUT_IDS[:1, :7]], progress=False)
    padded_ids = torch.cat([INPUT_IDS[:1, :7], torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 5])
    padded = routing_profile(
        model, [{"input_ids": padded_ids, "attention_mask": mask}], progress=False
    )
    assert torch.equal(alone.counts, padded.counts)
    assert torch.allclose(alone.token_entropy, padded.token_entropy)


def test_gate_means_of_a_grafted_model():
    model = build_tiny("mixtral", seed=0)
    selections = select_experts(model, [{"input_ids": INPUT_IDS}], FlexConfig())
    handle = graft(model, selections, FlexConfig(gate="sigmoid"))
    inputs = {}
    hooks = [
        layer.block.register_forward_pre_hook(
            lambda _m, args, i=layer.layer_index: inputs.__setitem__(i, args[0])
        )
        for layer in find_moe_layers(model)
    ]
    profile = routing_profile(model, [INPUT_IDS], progress=False)
    for hook in hooks:
        hook.remove()
    assert sorted(profile.gate_means) == sorted(handle.grafts)
    for layer_index, means in profile.gate_means.items():
        gate = handle.grafts[layer_index].gates[0]
        with torch.no_grad():
            expected = torch.sigmoid(gate.proj(inputs[layer_index])).mean()
        assert means == [pytest.approx(float(expected))]
    rows = routing_summary(profile)["layers"]
    assert [row["gate_mean"] for row in rows] == [profile.gate_means[i][0] for i in sorted(inputs)]
    force_gate_output(model, 0.25)
    forced = routing_profile(model, [INPUT_IDS], progress=False)
    assert all(means == [0.25] for means in forced.gate_means.values())


def test_bad_batches_are_refused():
    model = build_tiny("olmoe", seed=0)
    with pytest.raises(RoutingStatsError, match="input_ids"):
        routing_profile(model, [{"ids": INPUT_IDS}], progress=False)
    with pytest.raises(RoutingStatsError, match="no tokens"):
        routing_profile(model, [], progress=False)

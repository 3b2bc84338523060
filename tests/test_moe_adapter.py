"""The MoE adapter reproduces every family's block exactly: routing weights x expert outputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import DENSE, FAMILIES, UNSUPPORTED, build_tiny, save_tiny
from transformers import AutoModelForCausalLM

from flexmoe.moe import SUPPORTED_FAMILIES, UnsupportedModelError, describe, find_moe_layers
from flexmoe.moe.routing import RoutingSpec

TOKENS = 48


def _tokens(layer, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, layer.hidden_size, generator=generator)


def _block_output(block: torch.nn.Module, x2d: torch.Tensor) -> torch.Tensor:
    out = block(x2d.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).squeeze(0)  # GPT-OSS returns (out, scores)


def _router_dense(layer, x2d: torch.Tensor) -> torch.Tensor:
    _, top_weights, top_index = layer.router(x2d)
    dense = torch.zeros(x2d.shape[0], layer.num_experts)
    return dense.scatter_add_(-1, top_index, top_weights.float())


def _silence_shared_experts(layer) -> None:
    """Zero the shared experts so the block output is the routed mixture alone."""
    with torch.no_grad():
        for module in layer.shared_experts:
            for param in module.parameters():
                param.zero_()


def test_tiny_families_are_the_supported_ones():
    assert set(FAMILIES) == set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_block_output_is_dense_weights_times_expert_outputs(family, implementation):
    model = build_tiny(family)
    model.config._experts_implementation = implementation
    layers = find_moe_layers(model)
    assert layers
    for layer in layers:
        assert layer.experts.config._experts_implementation == implementation
        _silence_shared_experts(layer)
        x = _tokens(layer, seed=layer.layer_index)
        weights = layer.dense_weights(x)
        outputs = layer.expert_forward(x)
        assert outputs.shape == (layer.num_experts, TOKENS, layer.hidden_size)
        mixture = torch.einsum("te,eth->th", weights, outputs)
        torch.testing.assert_close(mixture, _block_output(layer.block, x), rtol=1e-4, atol=1e-5)
        # the spec agrees with the router's own (top-k index, top-k weight) choice ...
        torch.testing.assert_close(weights, _router_dense(layer, x), rtol=1e-5, atol=1e-6)
        assert ((weights > 0).sum(-1) == layer.top_k).all()
        # ... and routing is not degenerate: several experts get picked
        assert (weights > 0).any(0).sum() >= layer.num_experts // 2


@pytest.mark.parametrize(
    ("family", "shared_paths"),
    [
        ("qwen2_moe", ["mlp.shared_expert", "mlp.shared_expert_gate"]),
        ("deepseek_v3", ["mlp.shared_experts"]),
        ("granitemoeshared", ["shared_mlp"]),  # lives beside the block, in the decoder layer
        ("mixtral", []),
    ],
)
@torch.no_grad()
def test_shared_experts_are_found_wherever_they_live(family, shared_paths):
    model = build_tiny(family)
    for layer in find_moe_layers(model):
        decoder_layer = model.get_submodule(layer.path.rpartition(".")[0])
        expected = [decoder_layer.get_submodule(path) for path in shared_paths]
        assert [id(m) for m in layer.shared_experts] == [id(m) for m in expected]
        x = _tokens(layer)
        mixture = torch.einsum("te,eth->th", layer.dense_weights(x), layer.expert_forward(x))
        inside_block = any(path.startswith("mlp.") for path in shared_paths)
        # the block adds its in-block shared expert to the routed mixture (zeroed in the test above)
        differs = not torch.allclose(_block_output(layer.block, x), mixture, rtol=1e-4, atol=1e-5)
        assert differs == inside_block


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_expert_weights_views_reproduce_expert_forward(family):
    """The canonical gate/up/down views compute the same expert as the fused module."""
    layer = find_moe_layers(build_tiny(family))[0]
    x = _tokens(layer)
    for e in (0, layer.num_experts - 1):
        w = layer.expert_weights(e)
        assert w["up"].shape == (layer.intermediate_size, layer.hidden_size)
        assert w["down"].shape == (layer.hidden_size, layer.intermediate_size)
        gate = F.linear(x, w["gate"], w.get("gate_bias"))
        up = F.linear(x, w["up"], w.get("up_bias"))
        if family == "gpt_oss":  # clamped SwiGLU on de-interleaved gate/up
            limit, alpha = layer.experts.limit, layer.experts.alpha
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            hidden = (up + 1) * gate * torch.sigmoid(gate * alpha)
        else:
            hidden = F.silu(gate) * up
        expected = F.linear(hidden, w["down"], w.get("down_bias"))
        torch.testing.assert_close(layer.expert_forward(x, e), expected, rtol=1e-5, atol=1e-6)
        # views, not copies: grafting code must clone them
        assert w["down"].untyped_storage().data_ptr() == (
            layer.experts.down_proj.untyped_storage().data_ptr()
        )


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_single_allowed_expert_takes_all_the_weight(family):
    """FLEx's selection masks every expert but one: it then carries the whole (scaled) weight."""
    layer = find_moe_layers(build_tiny(family))[-1]
    x = _tokens(layer)
    spec = layer.routing
    for e in range(layer.num_experts):
        allowed = torch.zeros(layer.num_experts, dtype=torch.bool)
        allowed[e] = True
        weights = layer.dense_weights(x, allowed)
        expected = torch.zeros_like(weights)
        expected[:, e] = spec.routed_scaling_factor
        torch.testing.assert_close(weights, expected)


def _pruned_router(layer, keep: list[int]) -> torch.nn.Module:
    """A copy of the family's own router that only knows the experts in `keep`."""
    router = copy.deepcopy(layer.router)
    index = torch.tensor(keep)
    router.weight = torch.nn.Parameter(router.weight.data[index])
    if getattr(router, "bias", None) is not None:
        router.bias = torch.nn.Parameter(router.bias.data[index])
    if getattr(router, "e_score_correction_bias", None) is not None:
        router.e_score_correction_bias = router.e_score_correction_bias[index]
    router.num_experts = len(keep)
    if hasattr(router, "out_features"):
        router.out_features = len(keep)
    if getattr(router, "num_group", None):
        router.num_group = router.num_group * len(keep) // layer.num_experts
    return router


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_masked_routing_equals_the_router_without_the_masked_experts(family):
    """Masking experts out = the family's own router code run over the allowed experts only."""
    layer = find_moe_layers(build_tiny(family))[-1]
    spec = layer.routing
    # whole groups for group-limited routing (the pruned router regroups its experts)
    keep = list(range(6)) if spec.n_group > 1 else [1, 2, 5, 6, 7]
    x = _tokens(layer, seed=3)
    allowed = torch.zeros(layer.num_experts, dtype=torch.bool)
    allowed[keep] = True
    _, top_weights, top_index = _pruned_router(layer, keep)(x)
    expected = torch.zeros(TOKENS, layer.num_experts)
    expected.scatter_add_(-1, torch.tensor(keep)[top_index], top_weights.float())
    torch.testing.assert_close(layer.dense_weights(x, allowed), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_per_token_masks_apply_row_by_row():
    layer = find_moe_layers(build_tiny("deepseek_v3"))[-1]
    x = _tokens(layer)
    generator = torch.Generator().manual_seed(1)
    allowed = torch.rand(TOKENS, layer.num_experts, generator=generator) > 0.5
    allowed[0] = False  # a token with no allowed expert gets no weight at all
    weights = layer.dense_weights(x, allowed)
    assert (weights[0] == 0).all()
    assert (weights[~allowed] == 0).all()
    for t in (1, 7, 30):
        torch.testing.assert_close(weights[t], layer.dense_weights(x[t : t + 1], allowed[t])[0])


def test_bad_masks_are_refused_with_a_clear_error():
    layer = find_moe_layers(build_tiny("olmoe"))[0]
    x = _tokens(layer)
    with pytest.raises(ValueError, match="bool mask"):
        layer.dense_weights(x, torch.ones(layer.num_experts))
    with pytest.raises(ValueError, match="bool mask"):
        layer.dense_weights(x, torch.ones(layer.num_experts + 1, dtype=torch.bool))
    with pytest.raises(IndexError, match="out of range"):
        layer.expert_forward(x, layer.num_experts)


def test_dense_layers_are_skipped():
    assert [layer.layer_index for layer in find_moe_layers(build_tiny("qwen2_moe"))] == [0, 2]
    assert [layer.layer_index for layer in find_moe_layers(build_tiny("deepseek_v2"))] == [1, 2]
    assert describe(build_tiny("deepseek_v3"))["dense_layers"] == [0]


@pytest.mark.parametrize("family", list(DENSE) + list(UNSUPPORTED))
def test_dense_and_custom_moe_models_are_refused_by_name(family):
    model = build_tiny(family)
    with pytest.raises(UnsupportedModelError) as error:
        find_moe_layers(model)
    message = str(error.value)
    assert repr(model.config.model_type) in message
    assert "qwen2_moe" in message and "mixtral" in message


def test_a_misread_router_is_refused():
    """If the spec read from a router disagrees with what the router computes, refuse the model."""
    model = build_tiny("qwen3_moe")
    for layer in find_moe_layers(model):
        layer.router.norm_topk_prob = False  # spec now says "not renormalised" ...
        layer.router.forward = _renormalising_forward(layer.router)  # ... but it renormalises
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        find_moe_layers(model)


def _renormalising_forward(router):
    def forward(x):
        logits = F.linear(x, router.weight)
        top, index = logits.softmax(-1).topk(router.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    return forward


def test_describe_summarises_structure():
    summary = describe(build_tiny("deepseek_v3"))
    assert summary["model_type"] == "deepseek_v3" and summary["verified_family"]
    assert summary["moe_layers"] == 2 and summary["num_experts"] == 8 and summary["top_k"] == 3
    assert summary["block_path"] == "model.layers.{i}.mlp"
    assert "sigmoid" in summary["routing"] and "2 of 4 groups" in summary["routing"]
    assert summary["shared_experts"] is True


def test_routing_spec_follows_the_correction_bias_buffer():
    model = build_tiny("deepseek_v3")
    layer = find_moe_layers(model)[0]
    model.to(torch.float64)
    assert layer.routing.correction_bias is layer.router.e_score_correction_bias
    assert RoutingSpec.from_router(layer.router).correction_bias.dtype == torch.float64


def test_saved_tiny_model_reloads_with_the_same_moe_layers(tmp_path):
    path = save_tiny("qwen2_moe", tmp_path / "tiny")
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    original = build_tiny("qwen2_moe")
    for a, b in zip(find_moe_layers(reloaded), find_moe_layers(original), strict=True):
        assert a.path == b.path
        torch.testing.assert_close(a.expert_weights(3)["up"], b.expert_weights(3)["up"])


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_bf16_models_pass_the_routing_probe(family):
    """Real checkpoints run in bf16: the spec must still reproduce the router (PhiMoE's
    sparsemixer thresholds are evaluated in the logits' dtype, as the router does)."""
    model = build_tiny(family, seed=1).to(torch.bfloat16)
    layer = find_moe_layers(model)[0]
    x = _tokens(layer).to(torch.bfloat16)
    torch.testing.assert_close(
        layer.dense_weights(x), _router_dense(layer, x), rtol=2e-2, atol=1e-2
    )

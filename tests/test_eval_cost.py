"""Inference cost: active parameters per token from first principles, and the graft's increment."""

import pytest
import torch
from tiny_models import FAMILIES, build_tiny

from flexmoe.data import corpus_documents
from flexmoe.evaluation.cost import CostError, active_params_per_token, inference_cost
from flexmoe.flex import FlexConfig, graft, select_experts
from flexmoe.models.tokenizer import train_tokenizer
from flexmoe.moe import find_moe_layers

INPUT_IDS = torch.randint(3, 160, (2, 10), generator=torch.Generator().manual_seed(0))


def test_active_parameters_of_tiny_qwen2_moe_by_hand():
    model = build_tiny("qwen2_moe", seed=0)  # layers 0 and 2 sparse, layer 1 dense
    c = model.config
    h, head = c.hidden_size, c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head, c.num_key_value_heads * head
    attention = (h * q + q) + 2 * (h * kv + kv) + q * h  # q, k, v with biases (qkv_bias); o
    expert = 3 * h * c.moe_intermediate_size  # gate, up, down
    shared = 3 * h * c.shared_expert_intermediate_size + h  # + its 1-output sigmoid gate
    cost = active_params_per_token(model)
    assert cost["attention"] == 3 * attention
    assert cost["router"] == 2 * c.num_experts * h
    assert cost["routed_experts"] == 2 * c.num_experts_per_tok * expert
    assert cost["shared_experts"] == 2 * shared
    assert cost["dense_mlp"] == 3 * h * c.intermediate_size
    assert cost["lm_head"] == c.vocab_size * h
    assert cost["norms"] == (2 * 3 + 1) * h  # not counted: elementwise
    assert cost["graft_experts"] == cost["graft_gates"] == cost["other"] == 0
    active = 3 * attention + 2 * (c.num_experts * h + 2 * expert + shared)
    active += 3 * h * c.intermediate_size + c.vocab_size * h
    assert cost["active_params"] == active and cost["flops_per_token"] == 2 * active
    assert cost["total_params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_graft_adds_one_expert_and_one_gate_per_moe_layer(family):
    model = build_tiny(family, seed=0)
    before = active_params_per_token(model)
    layers = find_moe_layers(model)
    one_expert = sum(
        w.numel() for w in layers[0].expert_weights(0).values() if w is not None
    )  # gate/up/down (+ biases where the family has them)
    graft(model, select_experts(model, [{"input_ids": INPUT_IDS}], FlexConfig()), FlexConfig())
    after = active_params_per_token(model)
    assert after["graft_experts"] == len(layers) * one_expert
    assert after["graft_gates"] == len(layers) * (layers[0].hidden_size + 1)  # w . x + b
    extra = after["active_params"] - before["active_params"]
    assert extra == len(layers) * (one_expert + layers[0].hidden_size + 1)
    assert after["flops_per_token"] - before["flops_per_token"] == 2 * extra
    unchanged = ("attention", "router", "routed_experts", "shared_experts", "lm_head")
    assert all(after[key] == before[key] for key in unchanged)


def test_inference_cost_compares_with_the_model_without_its_graft():
    tokenizer = train_tokenizer(corpus_documents("heldout")[:1], 300)
    model = build_tiny("olmoe", seed=0, vocab_size=len(tokenizer))
    graft(model, select_experts(model, [{"input_ids": INPUT_IDS}], FlexConfig()), FlexConfig())
    result = inference_cost(
        None,
        model,
        tokenizer,
        ["the quick", "a lazy dog"],
        max_new_tokens=3,
        repeats=2,
        progress=False,
    )
    assert result["base"] == active_params_per_token(build_tiny("olmoe", vocab_size=len(tokenizer)))
    assert result["flops_ratio"] > 1
    assert result["latency"]["base_seconds"] > 0 and result["latency"]["ratio"] > 0
    with pytest.raises(CostError, match="same object"):
        inference_cost(model, model, tokenizer, ["x"], progress=False)

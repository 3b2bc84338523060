"""Expert selection: the vectorised reconstruction scores equal the brute-force definition
(rerun the real block with its router masked), for every routing kind, r = 1 and r = 2."""

import pytest
import torch
from tiny_models import FAMILIES, build_tiny

import flexmoe.flex.selection as selection_module
from flexmoe.config import ConfigError
from flexmoe.flex import FlexConfig, FlexError, graft, select_experts
from flexmoe.moe import find_moe_layers


def calibration(seed: int = 0, batches: int = 2, padded: bool = True) -> list[dict]:
    """Random token batches; the second row of each batch is right-padded."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        input_ids = torch.randint(3, 160, (2, 12), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        if padded:
            attention_mask[1, 8:] = 0
            input_ids[1, 8:] = 0
        out.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return out


# PhiMoE at r = 1 is left out: its real sparsemixer computes NaN weights when all but one
# expert are masked (its second pick takes a softmax over a row of -inf); RoutingSpec gives 0.
CASES = [(family, r) for family in FAMILIES for r in (1, 2) if (family, r) != ("phimoe", 1)]


@pytest.mark.parametrize(("family", "r"), CASES)
def test_vectorised_scores_equal_brute_force(family, r):
    model = build_tiny(family, seed=0)
    cfg = FlexConfig(r=r)
    fast = select_experts(model, calibration(), cfg)
    slow = select_experts(model, calibration(), cfg, scoring="brute-force")
    assert fast.keys() == slow.keys() == {layer.layer_index for layer in find_moe_layers(model)}
    for index, chosen in fast.items():
        assert chosen.search == "exhaustive"
        assert chosen.candidates == slow[index].candidates
        assert len(chosen.candidates) == len({tuple(c) for c in chosen.candidates})
        torch.testing.assert_close(
            torch.tensor(chosen.scores), torch.tensor(slow[index].scores), rtol=1e-5, atol=1e-6
        )
        assert chosen.selected == slow[index].selected
        assert chosen.scores[chosen.candidates.index(chosen.selected)] == min(chosen.scores)
        assert chosen.tokens == slow[index].tokens == 2 * (12 + 8)


def test_scores_separate_experts():
    """The scores are informative: they spread over experts (a constant score would pass the
    equality test above trivially)."""
    model = build_tiny("qwen3_moe", seed=0)
    for chosen in select_experts(model, calibration(), FlexConfig()).values():
        scores = torch.tensor(chosen.scores)
        assert scores.min() > 0
        assert (scores.max() - scores.min()) / scores.min() > 0.05


def test_greedy_search_matches_brute_force_and_extends_the_best_single_expert(monkeypatch):
    monkeypatch.setattr(selection_module, "EXHAUSTIVE_LIMIT", 3)  # C(8, 2) = 28 > 3: greedy
    model = build_tiny("olmoe", seed=0)
    single = select_experts(model, calibration(), FlexConfig(r=1))
    fast = select_experts(model, calibration(), FlexConfig(r=2))
    slow = select_experts(model, calibration(), FlexConfig(r=2), scoring="brute-force")
    for index, chosen in fast.items():
        assert chosen.search == "greedy"
        assert len(chosen.candidates) == 8 + 7
        assert chosen.selected[0] == single[index].selected[0]
        assert chosen.selected == slow[index].selected
        torch.testing.assert_close(
            torch.tensor(chosen.scores), torch.tensor(slow[index].scores), rtol=1e-5, atol=1e-6
        )


def test_padding_is_excluded():
    model = build_tiny("mixtral", seed=0)
    clean = calibration(padded=False, batches=1)
    padded = [dict(clean[0])]
    padded[0]["input_ids"] = torch.cat([clean[0]["input_ids"], torch.full((2, 5), 7)], dim=1)
    padded[0]["attention_mask"] = torch.cat(
        [clean[0]["attention_mask"], torch.zeros(2, 5, dtype=torch.long)], dim=1
    )
    reference = select_experts(model, clean, FlexConfig())
    with_padding = select_experts(model, padded, FlexConfig())
    for index, chosen in reference.items():
        assert with_padding[index].tokens == chosen.tokens == 24
        torch.testing.assert_close(
            torch.tensor(with_padding[index].scores), torch.tensor(chosen.scores)
        )


def test_calibration_is_capped_and_truncated(capsys):
    model = build_tiny("qwen3_moe", seed=0)
    data = calibration(padded=False, batches=3)
    cfg = FlexConfig(calibration_samples=3, calibration_max_length=10)
    capped = select_experts(model, data, cfg)
    expected_batches = [{k: v[:, :10] for k, v in batch.items()} for batch in data]
    expected_batches[1] = {k: v[:1] for k, v in expected_batches[1].items()}
    expected = select_experts(model, expected_batches[:2], FlexConfig())
    for index, chosen in capped.items():
        assert chosen.tokens == 3 * 10
        assert chosen.scores == pytest.approx(expected[index].scores, rel=1e-6)
    assert "3 of 3 calibration sequences were cut to 10 tokens" in capsys.readouterr().err


def test_selection_restores_train_mode_and_leaves_the_model_unchanged():
    model = build_tiny("qwen2_moe", seed=0).train()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    select_experts(model, calibration(), FlexConfig())
    assert model.training
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_most_routed_counts_the_routers_own_choices():
    model = build_tiny("qwen2_moe", seed=0)
    layers = find_moe_layers(model)
    counts = {layer.layer_index: torch.zeros(8) for layer in layers}
    data = calibration(padded=False)

    def count(index):
        def hook(router, args, output):
            counts[index] += torch.bincount(output[2].flatten(), minlength=8).float()

        return hook

    handles = [layer.router.register_forward_hook(count(layer.layer_index)) for layer in layers]
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for handle in handles:
        handle.remove()
    chosen = select_experts(model, data, FlexConfig(strategy="most-routed", r=2))
    for index, selection in chosen.items():
        assert selection.score_name == "routing_frequency"
        torch.testing.assert_close(torch.tensor(selection.scores).float(), counts[index] / 48)
        top_two = set(torch.topk(counts[index], 2).indices.tolist())
        assert set(selection.selected) == top_two


def test_random_strategy_is_seeded_and_needs_no_data():
    model = build_tiny("olmoe", seed=0)
    first = select_experts(model, [], FlexConfig(strategy="random", r=2, seed=3))
    again = select_experts(model, [], FlexConfig(strategy="random", r=2, seed=3))
    others = [
        select_experts(model, [], FlexConfig(strategy="random", r=2, seed=s)) for s in range(5)
    ]
    assert {i: s.selected for i, s in first.items()} == {i: s.selected for i, s in again.items()}
    assert len({tuple(o[0].selected) for o in others}) > 1
    assert all(len(set(s.selected)) == 2 and s.search == "random" for s in first.values())


def test_bad_input_is_refused_with_a_clear_error():
    model = build_tiny("olmoe", seed=0)
    with pytest.raises(FlexError, match="no calibration tokens"):
        select_experts(
            model,
            [
                {
                    "input_ids": torch.ones(1, 4, dtype=torch.long),
                    "attention_mask": torch.zeros(1, 4, dtype=torch.long),
                }
            ],
            FlexConfig(),
        )
    with pytest.raises(FlexError, match="input_ids"):
        select_experts(model, [{"tokens": torch.ones(1, 4)}], FlexConfig())
    with pytest.raises(FlexError, match="has only 8 experts"):
        select_experts(model, calibration(), FlexConfig(r=9))
    graft(model, select_experts(model, calibration(), FlexConfig()), FlexConfig())
    with pytest.raises(FlexError, match="already grafted"):
        select_experts(model, calibration(), FlexConfig())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "best"}, "strategy must be one of reconstruction, random, most-routed"),
        ({"gate": "relu"}, "gate must be one of sigmoid, zero-init, none"),
        ({"regime": "qlora"}, "regime must be one of full, lora"),
        ({"r": 0}, "r must be a positive integer"),
        ({"lora_dropout": 1.5}, "lora_dropout must be in"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ConfigError, match=message):
        FlexConfig(**options)

"""Loading MoE checkpoints from local directories, and refusing what flexmoe cannot adapt."""

import pytest
import torch
from tiny_models import DENSE, FAMILIES, UNSUPPORTED, build_tiny, save_tiny

from flexmoe.models.loading import ModelLoadError, UnsupportedModelError, load_model
from flexmoe.moe import find_moe_layers


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_supported_family_loads_from_a_local_directory(family, tmp_path):
    path = save_tiny(family, tmp_path / family)
    loaded = load_model(str(path), require_tokenizer=False, device="cpu")
    reference = build_tiny(family)
    ids = torch.randint(3, 150, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        actual = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert loaded.model.dtype == torch.float32
    assert len(find_moe_layers(loaded.model)) >= 1


@pytest.mark.parametrize("family", sorted(DENSE | UNSUPPORTED))
def test_dense_and_unsupported_models_are_refused_by_name(family, tmp_path):
    path = save_tiny(family, tmp_path / family)
    with pytest.raises(UnsupportedModelError) as err:
        load_model(str(path), require_tokenizer=False, device="cpu")
    message = str(err.value)
    assert "qwen2_moe" in message and "mixtral" in message, message


def test_missing_directory_gives_an_actionable_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(str(tmp_path / "nowhere"), require_tokenizer=False)


def test_model_without_tokenizer_is_refused_when_one_is_required(tmp_path):
    path = save_tiny("qwen2_moe", tmp_path / "m")
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        load_model(str(path), device="cpu")


def test_bfloat16_option(tmp_path):
    path = save_tiny("olmoe", tmp_path / "m")
    loaded = load_model(str(path), dtype="bfloat16", device="cpu", require_tokenizer=False)
    assert loaded.model.dtype == torch.bfloat16

"""Loading MoE checkpoints from local directories, and refusing what flexmoe cannot adapt."""

import socket

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tiny_models import DENSE, FAMILIES, UNSUPPORTED, build_tiny, save_tiny

from flexmoe.models import loading
from flexmoe.models.loading import (
    PROXY_VARIABLES,
    ModelLoadError,
    UnsupportedModelError,
    load_model,
    use_cache_only_if_hub_unreachable,
)
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


@pytest.fixture
def online_hub_at(monkeypatch):
    """Point the hub endpoint at 127.0.0.1:port with offline mode off and no proxy."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "_hub_probed", None)
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return lambda port: monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_hub_switches_to_the_cache_a_reachable_or_proxied_one_does_not(
    online_hub_at, monkeypatch
):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        online_hub_at(server.getsockname()[1])
        use_cache_only_if_hub_unreachable()
        assert not hub_constants.is_offline_mode()
    online_hub_at(closed_port())
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # the probe would bypass it
    use_cache_only_if_hub_unreachable()
    assert not hub_constants.is_offline_mode()
    monkeypatch.delenv("HTTPS_PROXY")
    use_cache_only_if_hub_unreachable()
    assert hub_constants.is_offline_mode()


def test_hub_id_loads_from_the_cache_and_a_mistyped_one_fails_clearly_when_unreachable(
    online_hub_at, monkeypatch, tmp_path
):
    snapshot = tmp_path / "models--acme--tiny-moe" / "snapshots" / ("0" * 40)
    save_tiny("qwen2_moe", snapshot)
    (tmp_path / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-moe" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    online_hub_at(closed_port())
    loaded = load_model("acme/tiny-moe", require_tokenizer=False, device="cpu")
    ids = torch.randint(3, 150, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids).logits, build_tiny("qwen2_moe")(input_ids=ids).logits
        )
    with pytest.raises(ModelLoadError, match="pass a local model directory instead of a hub id"):
        load_model("acme/tiny-mo", require_tokenizer=False, device="cpu")

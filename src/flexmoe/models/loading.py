"""Load any transformers MoE causal LM by hub id or local directory.

One code path for the tiny built-in model and for real checkpoints (Qwen1.5-MoE, OLMoE, Mixtral,
DeepSeek, Qwen3-MoE): the architecture is checked on the `meta` device first, so an unsupported
or dense model is refused before any weights are read or downloaded.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flexmoe.moe.adapter import UnsupportedModelError, find_moe_layers
from flexmoe.runtime import console

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_PROBE_SECONDS = 3.0
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what to pass instead."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    source: str


def resolve_device(device: str) -> str:
    """`auto` means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} requested but CUDA is not available: use --device cpu"
        )
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is float32 on the CPU (bf16 matmuls are slow there) and bfloat16 on a GPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(source: str):
    """Read a model's config from a local directory or the hub, with errors a user can act on."""
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{source!r} is not a model directory (no config.json there): pass a directory written by "
            "save_pretrained / `flexmoe pretrain`, or a hub id such as Qwen/Qwen1.5-MoE-A2.7B"
        )
    if not looks_local:
        use_cache_only_if_hub_unreachable()
    try:
        return AutoConfig.from_pretrained(str(path) if looks_local else source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load the config of {source!r}: {err}\n"
            "If this machine is offline, pass a local model directory instead of a hub id "
            "(or download the model into the hub cache where it has a connection)."
        ) from None


_hub_probed: str | None = None
"""The hub endpoint already probed by this process."""


def use_cache_only_if_hub_unreachable() -> None:
    """On a machine that cannot reach the hub, read hub ids from the local cache only.

    Otherwise huggingface_hub retries every file request with backoff (~25 s each) before a cached
    model loads or a mistyped id fails. A direct connection is probed once (skipped when offline
    mode is already on, or a proxy is configured, which the probe would bypass)."""
    global _hub_probed
    if _hub_probed == hub_constants.ENDPOINT:
        return
    if hub_constants.is_offline_mode() or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    _hub_probed = hub_constants.ENDPOINT
    endpoint = urlparse(hub_constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        hub_constants.HF_HUB_OFFLINE = True  # what HF_HUB_OFFLINE=1 sets; read on every request
        console.log(f"{host} is unreachable: hub models are read from the local cache only")


def check_supported(config) -> int:
    """Build the architecture on the meta device and find its MoE layers; returns their count."""
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ModelLoadError(
            f"transformers cannot build a causal LM for model type {config.model_type!r}: {err}"
        ) from None
    return len(find_moe_layers(skeleton))


def load_tokenizer(name: str) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer, or None when it has none.

    transformers 5 builds a placeholder tokenizer (one or two special tokens) for a directory
    without tokenizer files instead of failing; it encodes text to nothing, so it is refused.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        return None
    usable = len(tokenizer) > 2 and len(tokenizer("hello world")["input_ids"]) > 0
    return tokenizer if usable else None


def load_model(
    source: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    experts_implementation: str = "grouped_mm",
    require_tokenizer: bool = True,
) -> LoadedModel:
    """Load an MoE causal LM and its tokenizer; refuse dense or unsupported families clearly.

    `experts_implementation` defaults to `grouped_mm`, the fast fused path on CPU and GPU
    (7-9x faster than `eager` at 60 experts on this CPU).
    """
    config = load_config(source)
    check_supported(config)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    local = Path(source).expanduser()
    name = str(local) if local.exists() else source
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=torch_dtype,
            experts_implementation=experts_implementation,
            device_map=device if device.startswith("cuda") else None,
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the weights of {source!r}: {err}") from None
    if not device.startswith("cuda"):
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(name)
    if tokenizer is None and require_tokenizer:
        raise ModelLoadError(
            f"{source!r} has no usable tokenizer; save one next to the model "
            "(tokenizer.save_pretrained) or point to a checkpoint that includes it"
        )
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


__all__ = ["LoadedModel", "ModelLoadError", "UnsupportedModelError", "load_model"]

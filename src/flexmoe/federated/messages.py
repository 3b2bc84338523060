"""What travels in a message's config besides arrays: the resolved run configuration."""

from __future__ import annotations

import json
from typing import Any

from flexmoe import config as config_io
from flexmoe.federated.config import RunConfig


def encode_run_config(cfg: RunConfig) -> str:
    return cfg.to_json()


def decode_run_config(text: str) -> RunConfig:
    data: dict[str, Any] = json.loads(text)
    return config_io.build(RunConfig, data, where="run config")


def load_run_config(value: str) -> RunConfig:
    """A RunConfig from inline JSON or from a JSON/TOML/YAML file path (deployment run config)."""
    if value.lstrip().startswith("{"):
        return decode_run_config(value)
    return config_io.build(RunConfig, config_io.read_config_file(value), where=value)

"""flexmoe's built-in default base model: where it is cached, and building it on first use.

The model directory is an ordinary Hugging Face checkpoint under
`$FLEXMOE_HOME/models/flexmoe-tiny-moe-<recipe hash>` (`FLEXMOE_HOME` defaults to
`~/.cache/flexmoe`), so every command loads it exactly like a hub model. The recipe hash is part of
the name: a changed pretraining recipe builds a new model instead of silently reusing the old one.
"""

from __future__ import annotations

import os
from pathlib import Path

from flexmoe.models.pretrain import PretrainConfig, pretrain, read_metadata, recipe_hash
from flexmoe.runtime import console

DEFAULT_MODEL_NAME = "flexmoe-tiny-moe"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def flexmoe_home() -> Path:
    """flexmoe's cache root: $FLEXMOE_HOME, else ~/.cache/flexmoe."""
    return Path(os.environ.get("FLEXMOE_HOME") or "~/.cache/flexmoe").expanduser()


def model_dir_for(cfg: PretrainConfig) -> Path:
    """The cache directory of the model a pretraining config builds (default `--out`)."""
    return flexmoe_home() / "models" / f"{DEFAULT_MODEL_NAME}-{recipe_hash(cfg)}"


def default_model_dir() -> Path:
    """The cache directory of the built-in model (the default recipe)."""
    return model_dir_for(PretrainConfig())


def is_complete(model_dir: Path, cfg: PretrainConfig) -> bool:
    """True for a finished build of exactly this recipe (metadata written last, hash matching)."""
    metadata = read_metadata(model_dir)
    return (
        metadata is not None
        and metadata.get("recipe_hash") == recipe_hash(cfg)
        and all((Path(model_dir) / name).is_file() for name in REQUIRED_FILES)
    )


def ensure_default_model(progress: bool = True) -> Path:
    """The built-in model's directory, pretraining it first (about 10 minutes) if not cached."""
    cfg = PretrainConfig()
    model_dir = default_model_dir()
    if not is_complete(model_dir, cfg):
        console.log(
            f"building flexmoe's default base model in {model_dir} (once; about 10 minutes on "
            "2 CPU cores)"
        )
        pretrain(cfg, model_dir, progress=progress)
    return model_dir

"""A tiny MoE language model *with a tokenizer*, saved like a hub checkpoint, for runtime tests.

The tokenizer is a real byte-level BPE trained (offline, in a second) on bundled Alpaca text, so
prompts, label masking and generation run exactly as with a real checkpoint.
"""

from pathlib import Path

from tiny_models import build_tiny

from flexmoe.data import build_prompt, load_instructions
from flexmoe.models.tokenizer import train_tokenizer

VOCAB = 384


def save_tiny_lm(path: Path, family: str = "qwen2_moe", seed: int = 0) -> Path:
    records = load_instructions("code_alpaca")[:400]
    tokenizer = train_tokenizer([build_prompt(r) + r.response for r in records], VOCAB)
    model = build_tiny(family, seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

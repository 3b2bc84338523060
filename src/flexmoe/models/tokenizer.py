"""Train the built-in model's tokenizer: byte-level BPE, wrapped as a transformers fast tokenizer.

Byte-level BPE starts from the 256 byte values, so every string — accents, emoji, code, tabs,
`\\r\\n` — encodes without an unknown token and decodes back to exactly the same text. The
result is an ordinary `PreTrainedTokenizerFast` that `save_pretrained` writes and
`AutoTokenizer.from_pretrained` reads back, like any hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
"""Ends every document in pretraining, so the model learns where a text stops (as GPT-2/Qwen)."""
PAD_TOKEN = "<|pad|>"
"""A token of its own for padding, so masking padding never hides a real end-of-text."""
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""The 256 byte tokens plus the special tokens: no merges at all below this."""


class TokenizerTrainingError(ValueError):
    """A tokenizer that cannot be trained as asked; the message says what to change."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (bytes + merges + specials) on `texts`.

    Deterministic: the same texts in the same order give the same vocabulary and merges.
    No normaliser and no added prefix space, so `decode(encode(text)) == text` for any text.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerTrainingError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} tokens (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        raise TokenizerTrainingError(
            f"the training text supports only {tokenizer.get_vocab_size()} tokens, fewer than "
            f"vocab_size={vocab_size}: pass more text or a smaller vocab_size"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )

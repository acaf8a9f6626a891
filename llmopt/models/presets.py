"""Built-in models: a tiny random config per architecture, a 246M benchmark Llama, and the
embedded ``tiny-trained`` model (trained by scripts/train_tiny.py, shipped with its tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers

from llmopt.errors import UserError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
TINY_TRAINED = PRESET_DIR / "tiny_trained"
TEXT_DIR = PRESET_DIR / "text"
DEFAULT_CALIB_TEXT = TEXT_DIR / "calib.txt"
DEFAULT_EVAL_TEXT = TEXT_DIR / "eval.txt"

_TINY_VOCAB = 4096  # the embedded tokenizer's vocabulary, so every preset can read text
_TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=_TINY_VOCAB, max_position_embeddings=2048,
                   bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)

# name -> (config class, config kwargs, seed)
RANDOM_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("LlamaConfig", _TINY_LLAMA),
    "tiny-mistral": ("MistralConfig", {**_TINY_LLAMA, "sliding_window": None}),
    "tiny-qwen2": ("Qwen2Config", {**_TINY_LLAMA, "use_sliding_window": False}),
    "tiny-phi3": ("Phi3Config", {**_TINY_LLAMA}),
    "tiny-gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=2048, vocab_size=_TINY_VOCAB,
                                     bos_token_id=0, eos_token_id=0)),
    "bench-246m": ("LlamaConfig", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                                       num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                                       tie_word_embeddings=False)),
}
PRESETS = sorted([*RANDOM_PRESETS, "tiny-trained"])


def preset_names() -> str:
    return ", ".join(PRESETS)


def preset_config(name: str) -> Any:
    if name not in RANDOM_PRESETS:
        raise UserError(f"unknown preset {name!r}", f"available: {preset_names()}")
    cls_name, kwargs = RANDOM_PRESETS[name]
    return getattr(transformers, cls_name)(**kwargs)


def tokenizer_dir() -> Path | None:
    """The embedded tokenizer, shared by every preset (None until the tiny model is trained)."""
    return TINY_TRAINED if (TINY_TRAINED / "tokenizer.json").exists() else None

"""Tiny models and a tiny tokenizer for the quantization tests (built offline, seeded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

TEXT = (Path(__file__).resolve().parents[2] / "llmopt" / "presets" / "text" / "calib.txt")


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=320, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common, **overrides)
        return transformers.GPT2LMHeadModel(cfg).eval()
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common)
    kw.update(overrides)
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "phi3": "Phi3"}[arch]
    cfg = getattr(transformers, f"{cls}Config")(**kw)
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()


def realistic(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a random model trained-like statistics: norm weights with a few large channels (activation
    outliers downstream) and heavier-tailed linear weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith(("ln_1.weight", "ln_2.weight"))):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
                p[torch.randperm(p.numel(), generator=g)[:3]] *= 12
            elif p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g) * (1 + torch.rand(p.shape, generator=g)))
    return model


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 320) trained on the shipped calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT.read_text()[:20000]], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out

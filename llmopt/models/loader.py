"""Read checkpoints safely: config → model class from the registry, weights from safetensors,
with every tensor checked against the config (names, shapes, finiteness).

Never unpickles untrusted data: ``.bin`` weights only through ``torch.load(weights_only=True)``;
never ``trust_remote_code``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open

from llmopt.errors import UserError
from llmopt.models.registry import ArchSpec, spec_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


def read_config(directory: Path) -> tuple[Any, ArchSpec]:
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{directory}: no config.json", "pass a Hugging Face checkpoint directory or preset:NAME")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc})") from None
    spec = spec_for(raw.get("model_type"))
    config = getattr(transformers, spec.config_class).from_dict(raw)
    return config, spec


def build_model(config: Any, spec: ArchSpec, dtype: str = "float32", seed: int | None = None) -> torch.nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    return model.to(DTYPES[dtype]).eval()


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            raise UserError(f"{index}: not a valid safetensors index (needs weight_map)") from None
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise UserError(f"{directory}: shard {missing[0]} listed in the index is missing")
        return [directory / s for s in shards]
    st = sorted(directory.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise UserError(f"{directory}: no weights (*.safetensors or pytorch_model*.bin)")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".bin":
            try:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as exc:  # noqa: BLE001 - any failure is a refusal to unpickle
                raise UserError(f"{f}: refused to load pickle weights ({type(exc).__name__})",
                                "convert the checkpoint to safetensors") from None
            continue
        try:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    tensors[name] = sf.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{f}: corrupt safetensors file ({str(exc).splitlines()[0][:120]})",
                            "re-download or re-save the checkpoint") from None
    return tensors


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``tensors`` into ``model`` after checking names, shapes and finiteness."""
    expected = model.state_dict()
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    missing = [k for k in expected if k not in tensors and k not in tied]
    if missing:
        raise UserError(f"{source}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                        "the weights do not match config.json")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise UserError(f"{source}: unexpected tensor {unexpected[0]}", "the weights do not match config.json")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)}, config expects {tuple(expected[name].shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{source}: tensor {name} contains NaN or Inf values")
    with torch.no_grad():
        for name, t in tensors.items():
            expected[name].copy_(t.to(expected[name].dtype))
    if tied:
        model.tie_weights()


def load_tokenizer(directory: Path) -> Any | None:
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def load_model(path: Path, dtype: str = "float32") -> tuple[torch.nn.Module, Any | None]:
    """An eval-mode *ForCausalLM from an HF-layout directory, plus its tokenizer if present.

    A quantized checkpoint (quantization.json present) is rebuilt with dequantized weights.
    """
    path = Path(path)
    if (path / "quantization.json").exists():
        from llmopt.quant.format import load_dequantized

        model = load_dequantized(path).to(DTYPES[dtype]).eval()
        return model, load_tokenizer(path)
    config, spec = read_config(path)
    model = build_model(config, spec, dtype)
    load_state(model, read_tensors(weight_files(path)), path)
    return model, load_tokenizer(path)

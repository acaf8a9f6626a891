"""Read checkpoints safely: config → model class from the registry, weights tensor by tensor, every tensor
checked against the config (names, shapes, dtype kind, finiteness).

Never unpickles untrusted data: ``.bin`` weights only through ``torch.load(weights_only=True)``;
never ``trust_remote_code``. Tensor sources (:class:`TensorSource`) give shapes and dtypes without reading
data, so :func:`checked_names` can refuse a bad checkpoint before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
import transformers

from llmopt.errors import UserError
from llmopt.models.registry import ArchSpec, spec_for
from llmopt.models.safetensors_io import SafetensorsReader, checkpoint_files

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def info(self, name: str) -> tuple[tuple[int, ...], Any]: ...  # shape, dtype
    def get(self, name: str) -> torch.Tensor: ...


class DictSource:
    """Tensors already in memory (a built preset, legacy ``.bin`` weights)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.tensors[name]
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def read_config(directory: Path) -> tuple[Any, ArchSpec]:
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{directory}: no config.json", "pass a Hugging Face checkpoint directory or preset:NAME")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_path}: not a JSON object")
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> tuple[Any, ArchSpec]:
    spec = spec_for(raw.get("model_type"))
    return getattr(transformers, spec.config_class).from_dict(raw), spec


def build_model(config: Any, spec: ArchSpec, dtype: str = "float32", seed: int | None = None) -> torch.nn.Module:
    """A randomly initialized model (presets, tests)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    return model.to(DTYPES[dtype]).eval()


def empty_model(config: Any, spec: ArchSpec) -> torch.nn.Module:
    """The model's structure with parameters on the meta device (no memory, no init) and real buffers
    (rotary frequencies), ready for tensors assigned one at a time."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = getattr(transformers, spec.model_class)(config)
    return model.eval()


def expected_tensors(config: Any, spec: ArchSpec) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """name → shape of every tensor the checkpoint must hold, and the names that may be absent because
    they are tied to the input embedding."""
    model = empty_model(config, spec)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in expected else set()
    return expected, tied


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors (index shards or ``*.safetensors``), else pickle ``.bin``."""
    files = checkpoint_files(directory) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{directory}: no weights (*.safetensors or pytorch_model*.bin)")
    return files


def open_weights(directory: Path) -> TensorSource:
    files = weight_files(directory)
    if files[0].suffix == ".safetensors":
        return SafetensorsReader(files)
    bins = files
    tensors: dict[str, torch.Tensor] = {}
    for f in bins:
        try:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:  # noqa: BLE001 - any failure is a refusal to unpickle
            raise UserError(f"{f}: refused to load pickle weights ({type(exc).__name__})",
                            "convert the checkpoint to safetensors") from None
    return DictSource(tensors)


def checked_names(source: TensorSource, expected: dict[str, tuple[int, ...]], tied: set[str],
                  where: Path | str) -> list[str]:
    """The source's tensor names to keep (a tied lm_head stored beside its embedding is dropped), after
    checking that names, shapes and dtype kinds match the config."""
    names = source.names()
    missing = [k for k in expected if k not in names and k not in tied]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{where}: missing tensor {missing[0]}{more}", "the weights do not match config.json")
    unexpected = [k for k in names if k not in expected]
    if unexpected:
        raise UserError(f"{where}: unexpected tensor {unexpected[0]}", "the weights do not match config.json")
    for name in names:
        shape, dtype = source.info(name)
        if tuple(shape) != expected[name]:
            raise UserError(f"{where}: tensor {name} has shape {tuple(shape)}, config expects {expected[name]}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise UserError(f"{where}: tensor {name} has dtype {str(dtype).replace('torch.', '')} where a float weight "
                            "belongs", "this looks like a quantized checkpoint; pass the float (unquantized) one")
    return [n for n in names if n not in tied]


def check_values(name: str, t: torch.Tensor, where: Path | str) -> None:
    # a finite sum means finite values (10x faster than isfinite().all()); an overflowing sum is rechecked
    if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32)) and not torch.isfinite(t).all():
        raise UserError(f"{where}: tensor {name} contains NaN or Inf values")


def assign(model: torch.nn.Module, source: TensorSource, names: list[str], dtype: torch.dtype | None,
            where: Path | str) -> None:
    """Give ``model`` (possibly on the meta device) the source's tensors one at a time, cast to ``dtype``
    (each parameter's own dtype when None), then re-tie tied weights."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name in names:
            t = source.get(name)
            check_values(name, t, where)
            mod_name, _, attr = name.rpartition(".")
            module = model.get_submodule(mod_name)
            target = params.get(name, buffers.get(name))
            want = dtype or (target.dtype if target is not None else t.dtype)
            value = t.to(want).contiguous()
            if name in params:
                module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def load_tokenizer(directory: Path) -> Any | None:
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def load_model(path: Path, dtype: str = "float32") -> tuple[torch.nn.Module, Any | None]:
    """An eval-mode *ForCausalLM from an HF-layout directory, plus its tokenizer if present.

    Weights go tensor by tensor into a model built without allocating (no random init), so the peak is
    the model in ``dtype`` plus one tensor. A quantized checkpoint (quantization.json present) is
    rebuilt with dequantized weights.
    """
    path = Path(path)
    if (path / "quantization.json").exists():
        from llmopt.quant.format import load_dequantized

        model = load_dequantized(path).to(DTYPES[dtype]).eval()
        return model, load_tokenizer(path)
    config, spec = read_config(path)
    source = open_weights(path)
    expected, tied = expected_tensors(config, spec)
    names = checked_names(source, expected, tied, path)
    model = empty_model(config, spec)
    assign(model, source, names, DTYPES[dtype], path)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise UserError(f"{path}: tensor {meta[0]} was never loaded", "the weights do not match config.json")
    return model.eval(), load_tokenizer(path)

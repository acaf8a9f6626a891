"""GGUF input through transformers' GGUF loader, one tensor at a time.

transformers reads a GGUF's config and tokenizer (``from_pretrained(dir, gguf_file=name)``) and maps its
tensor names to Hugging Face names (``get_gguf_hf_weights_map`` and the per-architecture tensor processor
that undoes llama.cpp's q/k permutation). Its ``load_gguf_checkpoint(return_tensors=True)`` dequantizes
every tensor into one dict; :class:`GGUFSource` runs the same per-tensor steps on request instead, so the
peak is one dequantized tensor (plus the memory-mapped file), not the float model.

Dequantization to float is inherent: GGUF block formats (Q4_1, Q8_0, …) have no Hugging Face
equivalent. The values come out in float32; keeping them in float32 is exact (a Q4_1 weight is
``d·q + m`` with float16 ``d``, ``m``), bfloat16 would round them.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from llmopt.errors import UserError


def find_gguf(source: Path) -> Path | None:
    """The GGUF file a source names: the file itself, or the only ``*.gguf`` in a directory without a
    config.json; None when the source is not a GGUF."""
    if source.is_file() and source.suffix == ".gguf":
        return source
    if source.is_dir() and not (source / "config.json").exists():
        found = sorted(source.glob("*.gguf"))
        if len(found) > 1:
            raise UserError(f"{source}: holds {len(found)} .gguf files ({found[0].name}, {found[1].name}, …)",
                            "pass the one to load: llmopt load DIR/NAME.gguf")
        return found[0] if found else None
    return None


def _needs_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading GGUF needs the gguf package", "pip install gguf") from None


class GGUFFile:
    """One GGUF file, parsed once.

    ``gguf.GGUFReader`` parses every metadata field (the vocabulary and merges: ~6 s for SmolLM2) and
    transformers builds a fresh reader for its config, its tokenizer and its tensor map; the reader is
    shared with those calls (:meth:`_shared`), so the file is parsed once instead of four times.
    """

    def __init__(self, path: Path) -> None:
        _needs_gguf()
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except (ValueError, OSError) as exc:
            raise UserError(f"{path}: not a readable GGUF file ({str(exc).splitlines()[0][:120]})") from None

    @contextmanager
    def _shared(self) -> Iterator[None]:
        import gguf as _gguf

        original = _gguf.GGUFReader
        _gguf.GGUFReader = lambda *_a, **_k: self.reader  # type: ignore[assignment, misc]
        try:
            yield
        finally:
            _gguf.GGUFReader = original  # type: ignore[misc]

    def config(self) -> dict:
        """The Hugging Face config as a dict, without the gguf quantization_config (the weights are
        written dequantized, as a plain checkpoint)."""
        import transformers

        try:
            with self._shared():
                cfg = transformers.AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except (ValueError, KeyError, OSError, NotImplementedError) as exc:
            raise UserError(f"{self.path}: not a GGUF transformers can read ({str(exc).splitlines()[0][:120]})") from None
        raw = cfg.to_dict()
        raw.pop("quantization_config", None)
        raw.pop("_name_or_path", None)
        return raw

    def tensors(self, model: torch.nn.Module) -> "GGUFSource":
        with self._shared():
            return GGUFSource(self, model)

    def save_tokenizer(self, config: dict, out: Path) -> list[str]:
        """Tokenizer (with its chat template) and a generation config from the metadata, into ``out``."""
        import transformers

        before = {p.name for p in out.iterdir()}
        with self._shared():
            tok = transformers.AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        tok.save_pretrained(str(out))
        gen = transformers.GenerationConfig(**{k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                               if config.get(k) is not None})
        gen.save_pretrained(str(out))
        return sorted({p.name for p in out.iterdir()} - before)


class _TopLevel:
    """A model seen by ``get_gguf_hf_weights_map`` without its submodules: the top-level names map every
    tensor of a *ForCausalLM; the function's walk into each of ~400 submodules (for models saved from a base
    class) rebuilds gguf's name table each time (17 s for SmolLM2) and adds nothing here."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = model.config
        self._state = model.state_dict()

    def state_dict(self) -> dict:
        return self._state

    def named_children(self) -> Iterator:
        return iter(())


class GGUFSource:
    """The tensors of a GGUF file under their Hugging Face names, dequantized to float32 on request."""

    def __init__(self, file: GGUFFile, model: torch.nn.Module) -> None:
        """``model``: the target architecture (on the meta device) whose names the GGUF names map to."""
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, load_gguf_checkpoint, read_field)

        reader = file.reader
        arch = read_field(reader, "general.architecture")[0]
        parsed = load_gguf_checkpoint(str(file.path), return_tensors=False)
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
        mapping = get_gguf_hf_weights_map(_TopLevel(model), self.processor)
        self._tensors: dict[str, Any] = {mapping[t.name]: t for t in reader.tensors if t.name in mapping}
        self.skipped = [t.name for t in reader.tensors if t.name not in mapping]

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._tensors[name]
        return tuple(int(d) for d in reversed(t.shape.tolist())), torch.float32

    def quant_types(self) -> dict[str, int]:
        """GGUF tensor type name → number of tensors (what the file stored before dequantization)."""
        out: dict[str, int] = {}
        for t in self._tensors.values():
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
        return out

    def get(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        t = self._tensors[name]
        weights = dequantize(t.data, t.tensor_type)
        weights = self.processor.process(weights=weights, name=t.name, tensor_key_mapping={}, parsed_parameters={}).weights
        return torch.from_numpy(np.array(weights, dtype=np.float32, copy=True))

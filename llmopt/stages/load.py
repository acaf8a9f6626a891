"""load: a local HF checkpoint, a GGUF file or a preset → a validated checkpoint artifact (HF layout).

Streams: every tensor is read, checked (name, shape, float dtype, finite values), converted and written
on its own, so the peak is one tensor plus the mapped source file, not the model. Single or sharded
safetensors in (``model.safetensors.index.json``), single or sharded out (``max_shard_gb``). ``dtype:
auto`` keeps each tensor's source dtype (GGUF: float32, what dequantization gives). A tied lm_head is kept
tied: stored once, as the embedding.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers

from llmopt.artifact import Artifact
from llmopt.errors import UserError
from llmopt.estimates import load_estimate
from llmopt.models import gguf, loader, presets
from llmopt.models.registry import dims_of
from llmopt.models.safetensors_io import CheckpointWriter, TensorSpec
from llmopt.progress import Progress
from llmopt.recipe import LoadConfig
from llmopt.stages.base import Stage

PRESET_SEED = 0


@dataclass
class Opened:
    """A source ready to stream: its config (raw dict), tensors, and how to bring its tokenizer along."""

    raw_config: dict
    tensors: loader.TensorSource
    where: str
    tokenizer: Callable[[Path], list[str]] = lambda out: []
    metadata: dict = field(default_factory=dict)


def _copy_tokenizer(src: Path) -> Callable[[Path], list[str]]:
    def copy(out: Path) -> list[str]:
        copied = []
        for name in loader.TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
                copied.append(name)
        return copied

    return copy


def _from_dir(src: Path, tokenizer_dir: Path | None = None) -> Opened:
    loader.read_config(src)  # the one-line errors for a missing / bad config
    raw = json.loads((src / "config.json").read_text())
    return Opened(raw_config=raw, tensors=loader.open_weights(src), where=str(src),
                  tokenizer=_copy_tokenizer(tokenizer_dir or src))


def _from_preset(name: str) -> Opened:
    if name == "tiny-trained":
        if not (presets.TINY_TRAINED / "config.json").exists():
            raise UserError("preset:tiny-trained is not in this installation", "run scripts/train_tiny.py")
        return _from_dir(presets.TINY_TRAINED)
    config = presets.preset_config(name)
    model = loader.build_model(config, loader.spec_for(config.model_type), "float32", seed=PRESET_SEED)
    tok = presets.tokenizer_dir()
    return Opened(raw_config=config.to_dict(), tensors=loader.DictSource(model.state_dict()), where=f"preset:{name}",
                  tokenizer=_copy_tokenizer(tok) if tok is not None else (lambda out: []))


def _from_gguf(path: Path) -> Opened:
    file = gguf.GGUFFile(path)
    raw = file.config()
    config, spec = loader.config_from_dict(raw)
    source = file.tensors(loader.empty_model(config, spec))
    return Opened(raw_config=raw, tensors=source, where=str(path),
                  tokenizer=lambda out: file.save_tokenizer(raw, out),
                  metadata={"gguf": {"file": path.name, "tensor_types": source.quant_types(),
                                     "dequantized_to": "float32", "skipped_tensors": source.skipped}})


def _open(source: str) -> Opened:
    if source.startswith("preset:"):
        return _from_preset(source.split(":", 1)[1])
    src = Path(source)
    found = gguf.find_gguf(src) if src.exists() else None
    if found is not None:
        return _from_gguf(found)
    if not src.is_dir():
        raise UserError(f"{src}: no such checkpoint directory or .gguf file",
                        "pass a local HF checkpoint dir, a .gguf file or preset:NAME")
    return _from_dir(src)


def _plan(opened: Opened, names: list[str], dtype: str) -> list[TensorSpec]:
    plan = []
    for name in names:
        shape, src_dtype = opened.tensors.info(name)
        plan.append(TensorSpec(name, src_dtype if dtype == "auto" else loader.DTYPES[dtype], tuple(shape)))
    return plan


def _generation_config(raw: dict, out: Path) -> None:
    if not (out / "generation_config.json").exists():
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        transformers.GenerationConfig(**{k: raw[k] for k in keys if raw.get(k) is not None}).save_pretrained(str(out))


def run(config: LoadConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    with progress.task(f"open {config.source}"):
        opened = _open(config.source)
        cfg, spec = loader.config_from_dict(opened.raw_config)
        expected, tied = loader.expected_tensors(cfg, spec)
        names = loader.checked_names(opened.tensors, expected, tied, opened.where)
        plan = _plan(opened, names, config.dtype)
    max_shard = int(config.max_shard_gb * 1e9) if config.max_shard_gb else None
    with progress.task("convert and write tensors", total=len(plan)) as advance:
        with CheckpointWriter(out, plan, max_shard, metadata={"format": "pt"}) as writer:
            for spec_ in plan:
                t = opened.tensors.get(spec_.name)
                loader.check_values(spec_.name, t, opened.where)
                writer.write(spec_.name, t.to(spec_.dtype))
                del t
                advance(1)
    by_bytes: Counter = Counter()
    for s in plan:
        by_bytes[s.dtype] += s.nbytes
    main_dtype = loader.DTYPE_NAMES.get(by_bytes.most_common(1)[0][0], "float32")
    raw = {k: v for k, v in opened.raw_config.items() if k != "torch_dtype"}
    raw["dtype"] = main_dtype
    if not raw.get("architectures"):  # GGUF / preset configs lack it; HF tools (GenAI's builder) read it
        raw["architectures"] = [spec.model_class]
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True, default=str) + "\n")
    copied = opened.tokenizer(out)
    _generation_config(raw, out)
    return {
        "architecture": spec.name,
        "source": config.source,
        "dtype": main_dtype,
        "tensor_dtypes": {loader.DTYPE_NAMES.get(d, str(d)): n for d, n in sorted(by_bytes.items(), key=str)},
        "parameters": sum(torch.Size(s.shape).numel() for s in plan),
        "weights_bytes": sum(s.nbytes for s in plan),
        "shards": len(writer.files),
        "tied_embeddings": bool(tied),
        "dims": asdict(dims_of(cfg)),
        "tokenizer": (out / "tokenizer.json").exists() or (out / "tokenizer.model").exists(),
        "tokenizer_files": copied,
        **opened.metadata,
    }


STAGE = Stage(name="load", kind="checkpoint", version=3, config_model=LoadConfig, run=run, estimate=load_estimate)

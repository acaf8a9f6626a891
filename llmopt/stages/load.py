"""load: a local HF checkpoint or a preset → a validated checkpoint artifact (HF layout)."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from llmopt.artifact import Artifact
from llmopt.errors import UserError
from llmopt.models import loader, presets
from llmopt.models.registry import dims_of, spec_for
from llmopt.progress import Progress
from llmopt.recipe import LoadConfig
from llmopt.stages.base import Stage

PRESET_SEED = 0


def _from_preset(name: str, dtype: str) -> tuple[torch.nn.Module, Path | None]:
    if name == "tiny-trained":
        if not (presets.TINY_TRAINED / "config.json").exists():
            raise UserError("preset:tiny-trained is not in this installation", "run scripts/train_tiny.py")
        model, _ = loader.load_model(presets.TINY_TRAINED, dtype)
        return model, presets.TINY_TRAINED
    config = presets.preset_config(name)
    model = loader.build_model(config, spec_for(config.model_type), dtype, seed=PRESET_SEED)
    return model, presets.tokenizer_dir()


def run(config: LoadConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    source = config.source
    with progress.task(f"load {source}"):
        if source.startswith("preset:"):
            model, tok_dir = _from_preset(source.split(":", 1)[1], config.dtype)
        else:
            src = Path(source)
            if not src.is_dir():
                raise UserError(f"{src}: no such checkpoint directory", "pass a local HF checkpoint dir or preset:NAME")
            model, _ = loader.load_model(src, config.dtype)
            tok_dir = src
    with progress.task("write safetensors"):
        model.save_pretrained(out, safe_serialization=True)
        copied = []
        if tok_dir is not None:
            for name in loader.TOKENIZER_FILES:
                # the source's generation_config.json (every eos id) wins over the one save_pretrained wrote
                if (tok_dir / name).exists() and (name == "generation_config.json" or not (out / name).exists()):
                    shutil.copy2(tok_dir / name, out / name)
                    copied.append(name)
    cfg = model.config
    return {
        "architecture": spec_for(cfg.model_type).name,
        "source": source,
        "dtype": config.dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dims": asdict(dims_of(cfg)),
        "tokenizer": bool(copied and "tokenizer.json" in copied or (out / "tokenizer.model").exists()),
        "tokenizer_files": copied,
    }


STAGE = Stage(name="load", kind="checkpoint", version=1, config_model=LoadConfig, run=run)

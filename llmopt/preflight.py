"""Check everything a recipe names before the first stage runs: files, model source, backend, envelope.

A convert that would fail at validate on a missing eval text, or at build on a missing TensorRT, fails
here instead, in one line that names the recipe field.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmopt.errors import UserError
from llmopt.paths import overlap
from llmopt.recipe import Recipe

RECIPE_HINT = "fix the recipe (paths are relative to the recipe file) or override it with --set"


def _file(field: str, value: Path | None) -> None:
    if value is None:
        return
    p = Path(value)
    if not p.exists():
        raise UserError(f"recipe {field}: {p} does not exist", RECIPE_HINT)
    if not p.is_file():
        raise UserError(f"recipe {field}: {p} is not a file", RECIPE_HINT)


def _max_positions(source: str) -> int | None:
    """The model's position limit from its config, without loading weights."""
    from llmopt.models import presets

    if source.startswith("preset:"):
        name = source.split(":", 1)[1]
        if name == "tiny-trained":
            raw = json.loads((presets.TINY_TRAINED / "config.json").read_text())
        elif name in presets.RANDOM_PRESETS:
            raw = presets.preset_config(name).to_dict()
        else:
            raise UserError(f"recipe model.source: unknown preset {name!r}", f"available: {presets.preset_names()}")
    else:
        src = Path(source)
        if not src.is_dir():
            raise UserError(f"recipe model.source: {src} is not a directory", "point it at a local Hugging Face "
                            "checkpoint directory (config.json + *.safetensors) or preset:NAME")
        try:
            raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"recipe model.source: {src} has no config.json", "point it at a Hugging Face "
                            "checkpoint directory") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{src / 'config.json'}: cannot be read as JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe model.source: {source}: config.json is not a JSON object")
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(raw.get(key), int) and raw[key] > 0:
            return raw[key]
    return None


def _backend(recipe: Recipe) -> None:
    if recipe.build.backend != "tensorrt":
        return
    from llmopt.trt.adapter import import_tensorrt
    from llmopt.trt.gpu import INSTALL_HINT, require_gpu

    try:
        import_tensorrt()
        require_gpu()
    except UserError as exc:
        raise UserError(f"recipe build.backend: tensorrt: {exc.message}",
                        f"{INSTALL_HINT}; or set build.backend: onnxruntime in the recipe") from None


def preflight(recipe: Recipe, workdir: Path, stages: list[str]) -> None:
    source = recipe.model.source
    if not source.startswith("preset:"):
        rel = overlap(Path(workdir).resolve(), Path(source).resolve())
        if rel in ("is", "is inside"):
            raise UserError(f"{workdir}: work directory {rel} the model source {source}",
                            "pass -w outside the checkpoint directory")
    max_pos = _max_positions(source)
    if max_pos is not None and recipe.envelope.total_len[2] > max_pos:
        raise UserError(f"recipe envelope.total_len max {recipe.envelope.total_len[2]} exceeds the model's "
                        f"{max_pos} positions", f"set envelope.total_len to at most [.., .., {max_pos}]")
    if "quantize" in stages:
        _file("quantize.calibration.text", recipe.quantize.calibration.text)
    if recipe.build.kv_cache == "int8":
        _file("build.kv_calibration.text", recipe.build.kv_calibration.text)
    if "validate" in stages:
        _file("validate.eval_text", recipe.validate_.eval_text)
    _backend(recipe)

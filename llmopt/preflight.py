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
        if _is_gguf(src):
            return None
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
    return _positions(raw)


def _positions(raw: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(raw.get(key), int) and raw[key] > 0:
            return raw[key]
    return None


def check_envelope_against_lineage(total_max: int, artifact, field: str = "--total-len") -> None:  # noqa: ANN001
    """The envelope's longest sequence fits the positions of the checkpoint the artifact came from."""
    from llmopt.artifact import lineage
    from llmopt.readers import read_json

    ckpt = next((a for a in lineage(artifact) if a.kind == "checkpoint"), None)
    if ckpt is None or not (ckpt.path / "config.json").is_file():
        return
    max_pos = _positions(read_json(ckpt.path / "config.json", "config.json"))
    if max_pos is not None and total_max > max_pos:
        raise UserError(f"{field} max {total_max} exceeds the model's {max_pos} positions",
                        f"use a total length of at most {max_pos}")


def _is_gguf(src: Path) -> bool:
    """A .gguf file, or a directory holding .gguf files and no config.json (the GGUF loader's sources)."""
    if src.is_file():
        return src.suffix == ".gguf"
    return src.is_dir() and not (src / "config.json").exists() and any(src.glob("*.gguf"))


def _validate_fits(recipe: Recipe) -> None:
    """validate's prompts plus its generated tokens fit the engine the envelope builds (its KV capacity is
    envelope.total_len max); custom prompts are measured by validate itself, once tokenized."""
    from llmopt.stages.validate import PROMPT_LENGTHS

    v = recipe.validate_
    if v.prompts:
        return
    need = max(PROMPT_LENGTHS) + max(v.decode_tokens, 16)
    have = recipe.envelope.total_len[2]
    if have < need:
        raise UserError(f"recipe envelope.total_len max {have} is too short for validate: it runs prompts of up to "
                        f"{max(PROMPT_LENGTHS)} tokens and generates {max(v.decode_tokens, 16)} (validate.decode_tokens, "
                        f"at least 16), {need} in all", f"set envelope.total_len max to at least {need} or lower "
                        "validate.decode_tokens in the recipe (or --set)")


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
        check_source(Path(source))
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
        _validate_fits(recipe)
    _backend(recipe)


# config.json fields that must be positive integers when present (names as the HF configs spell them)
POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "max_position_embeddings", "head_dim", "n_embd", "n_layer", "n_head", "n_positions",
                 "n_inner")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_source(src: Path) -> None:
    """A local checkpoint directory is readable before anything is loaded: config.json an object with sane
    sizes, a shard index whose names stay inside the directory, a tokenizer that parses without remote code."""
    from llmopt.paths import safe_join
    from llmopt.readers import read_json

    src = Path(src)
    if _is_gguf(src):
        return  # read by the GGUF loader, which checks its own format
    if not src.is_dir():
        raise UserError(f"{src}: no such checkpoint directory", "pass a local HF checkpoint dir or preset:NAME")
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{src}: no config.json", "pass a Hugging Face checkpoint directory or preset:NAME")
    raw = read_json(cfg_path, "config.json")
    for key in POSITIVE_INTS:
        v = raw.get(key)
        if key in raw and v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise UserError(f"{cfg_path}: {key} must be a positive integer, not {v!r}", "fix or re-download config.json")
    heads, hidden = raw.get("num_attention_heads", raw.get("n_head")), raw.get("hidden_size", raw.get("n_embd"))
    if isinstance(heads, int) and isinstance(hidden, int) and "head_dim" not in raw and hidden % heads:
        raise UserError(f"{cfg_path}: hidden size {hidden} is not divisible by {heads} attention heads")
    index = src / "model.safetensors.index.json"
    if index.exists():
        data = read_json(index, "safetensors index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: weight_map must map tensor names to shard file names")
        for shard in set(weight_map.values()):
            safe_join(src, shard, "shard")
    _check_tokenizer(src)


def _check_tokenizer(src: Path) -> None:
    from llmopt.readers import read_json

    cfg = src / "tokenizer_config.json"
    if cfg.exists():
        tc = read_json(cfg, "tokenizer_config.json")
        if tc.get("auto_map"):
            raise UserError(f"{cfg}: the tokenizer needs remote code (auto_map), which llmopt never runs",
                            "use a checkpoint whose tokenizer transformers implements (tokenizer.json)")
    if not any((src / f).exists() for f in TOKENIZER_MARKERS):
        return
    import transformers

    try:
        transformers.AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - the boundary: whatever the tokenizer libraries raise on a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{src}: the tokenizer files cannot be loaded ({type(exc).__name__}: {first})",
                        "fix or re-download tokenizer.json / tokenizer_config.json") from None

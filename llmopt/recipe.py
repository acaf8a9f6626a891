"""Typed stage configurations and the YAML recipe that chains them.

Each stage's subcommand and the recipe section use the same pydantic model, with
``extra="forbid"``: a misspelled field is an error naming the field and the allowed names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmopt.errors import UserError

DType = Literal["float32", "float16", "bfloat16"]
STAGES = ("load", "quantize", "export", "build", "validate")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoadConfig(Strict):
    source: str = Field(description="local HF checkpoint directory, .gguf file (or a directory holding one) or preset:NAME")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto keeps each tensor's source dtype (GGUF: float32)")
    max_shard_gb: float | None = Field(None, gt=0, description="split the safetensors output into shards of at most "
                                                               "this size; None = one file")


class CalibrationConfig(Strict):
    text: Path | None = Field(None, description="text file; default: the calibration text shipped with llmopt")
    samples: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=8)


class KvCalibrationConfig(CalibrationConfig):
    samples: int = Field(16, ge=1)


class QuantizeConfig(Strict):
    method: Literal["rtn", "gptq", "awq", "smoothquant"] = "rtn"
    bits: Literal[4, 8] = 4
    group_size: int | None = Field(128, description="int4 group size along the input dim; None = per channel")
    symmetric: bool = True
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"],
                              description="fnmatch patterns of module names kept in float")
    calibration: CalibrationConfig = CalibrationConfig()
    damp: float = Field(0.01, gt=0, description="GPTQ dampening (fraction of mean diagonal)")
    block_size: int = Field(128, ge=1, description="GPTQ lazy-update block size")
    act_order: bool = Field(True, description="GPTQ: process columns by decreasing Hessian diagonal (groups stay "
                                                "contiguous, no g_idx); SmolLM2 int4 g128 ppl +30 % vs +48 % without")
    alpha: float = Field(0.5, ge=0, le=1, description="SmoothQuant migration strength")
    awq_grid: int = Field(20, ge=2, description="AWQ scale search grid points")
    error_stats: bool = Field(False, description="RTN: also measure each linear's output error on the calibration "
                                                 "text (runs the model layer by layer instead of streaming weights)")

    @model_validator(mode="after")
    def _check(self) -> "QuantizeConfig":
        if self.method == "smoothquant" and self.bits != 8:
            raise ValueError("smoothquant is W8A8: set bits: 8")
        if self.method == "awq" and self.bits != 4:
            raise ValueError("awq is int4 weight-only: set bits: 4")
        if self.group_size is not None and self.group_size not in (32, 64, 128, 256):
            raise ValueError("group_size must be one of 32, 64, 128, 256 (or null for per channel)")
        return self


class ExportConfig(Strict):
    opset: int = Field(23, ge=18, le=23)
    dtype: Literal["float32", "float16"] = "float32"


class Envelope(Strict):
    """The serving shape range as [min, opt, max] per axis."""

    batch: tuple[int, int, int] = (1, 1, 4)
    input_len: tuple[int, int, int] = (1, 128, 1024)
    total_len: tuple[int, int, int] = (1, 512, 2048)

    @model_validator(mode="after")
    def _ordered(self) -> "Envelope":
        for name in ("batch", "input_len", "total_len"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"{name} must satisfy 1 <= min <= opt <= max, got {[lo, opt, hi]}")
        if self.input_len[2] > self.total_len[2]:
            raise ValueError("input_len max cannot exceed total_len max")
        return self


class BuildConfig(Strict):
    envelope: Envelope = Field(Envelope(), description="set from the recipe's top-level envelope")
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int | None = Field(None, ge=1, description="intra-op threads; default: physical cores")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="MatMulNBits accuracy level (4 = int8 activations)")
    attention: Literal["auto", "gqa", "standard"] = Field(
        "auto", description="ONNX Runtime CPU: gqa = GroupQueryAttention over a preallocated KV buffer; auto = gqa where "
                            "the graph allows it, else the exported standard Attention")
    quantize_lm_head: Literal["none", "int8", "int4"] = Field(
        "none", description="ONNX Runtime: quantize a float lm_head to MatMulNBits (block-wise, 32)")
    kv_cache: Literal["float", "int8"] = Field(
        "float", description="ONNX Runtime CPU GroupQueryAttention: int8 = the KV cache is stored as int8 with "
                             "per-channel scales calibrated at build time (4x less cache memory and traffic)")
    kv_calibration: KvCalibrationConfig = Field(KvCalibrationConfig(),
                                                description="prompts whose K/V ranges set the int8 KV cache scales")
    workspace_gib: float = Field(4.0, gt=0)
    timing_cache: Path | None = None
    hardware_compat: Literal["none", "ampere+", "same-compute-capability"] = "none"
    version_compatible: bool = False

    @model_validator(mode="after")
    def _kv_cache_target(self) -> "BuildConfig":
        if self.kv_cache == "int8" and (self.backend, self.device) != ("onnxruntime", "cpu"):
            raise ValueError("kv_cache int8 is implemented for backend onnxruntime on device cpu "
                             "(GroupQueryAttention); use kv_cache: float")
        if self.kv_cache == "int8" and self.attention == "standard":
            raise ValueError("kv_cache int8 needs attention auto or gqa (the GroupQueryAttention cache)")
        return self


class Gates(Strict):
    max_logits_rel_error: float | None = None
    max_ppl_increase_pct: float | None = None
    min_top1_agreement: float | None = None
    max_kl: float | None = None
    min_greedy_agreement: float | None = None


class ValidateConfig(Strict):
    eval_text: Path | None = Field(None, description="default: the eval text shipped with llmopt")
    eval_tokens: int = Field(2048, ge=16)
    decode_tokens: int = Field(32, ge=1)
    prompts: list[str] | None = None
    gates: Gates | Literal["none"] = Field(
        Gates(), description="unset gates take the default for the artifact (llmopt/gates.py); 'none' disables gating")


class Recipe(Strict):
    name: str = Field("recipe", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                      description="names the default work directory work/NAME: letters, digits, . _ - only")
    model: LoadConfig
    quantize: QuantizeConfig | None = None
    export: ExportConfig = ExportConfig()
    envelope: Envelope = Envelope()
    build: BuildConfig = BuildConfig()
    validate_: ValidateConfig | None = Field(None, alias="validate")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    """One readable line per bad field; unknown fields list the allowed names."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "recipe"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_names(model, e["loc"][:-1])
            lines.append(f"• {where}: unknown field; allowed: {', '.join(allowed)}")
        else:
            lines.append(f"• {where}: {e['msg'].removeprefix('Value error, ')}")
    return lines


def _allowed_names(model: type[BaseModel], loc: tuple) -> list[str]:
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            for f in getattr(current, "model_fields", {}).values():
                if f.alias == part:
                    field = f
        if field is None:
            break
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                current = cand
                break
    fields = getattr(current, "model_fields", {})
    return sorted(f.alias or n for n, f in fields.items())


class RecipeError(UserError):
    def __init__(self, source: str, lines: list[str], what: str = "recipe") -> None:
        super().__init__(f"{source}: invalid {what}\n" + "\n".join(lines))
        self.lines = lines


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except (yaml.YAMLError, RecursionError):
        raise UserError(f"--set value {text!r}: not a valid YAML value", "quote it, e.g. --set name='\"x\"'") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` overrides (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE", "e.g. --set quantize.bits=8")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"--set {key!r}: empty field name", "e.g. --set quantize.bits=8")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = parse_value(value)
    return data


def _resolve_paths(data: dict, base: Path) -> dict:
    def fix(section: str, field: str) -> None:
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(field), str):
            sec[field] = str((base / sec[field]).resolve())

    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("source"), str) and not model["source"].startswith("preset:"):
        model["source"] = str((base / model["source"]).resolve())
    fix("validate", "eval_text")
    fix("build", "timing_cache")
    q = data.get("quantize")
    if isinstance(q, dict):
        cal = q.get("calibration")
        if isinstance(cal, dict) and isinstance(cal.get("text"), str):
            cal["text"] = str((base / cal["text"]).resolve())
    return data


MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 16


MAX_NODES = 100_000


def _too_complex(value: Any) -> str | None:
    """Why parsed YAML is not a plausible recipe: nested deeper than MAX_DEPTH, or more than MAX_NODES values
    once aliases are expanded (an alias bomb expands to billions); None when it is fine."""
    stack = [(value, 1)]
    seen = 0
    while stack:
        v, d = stack.pop()
        seen += 1
        if d > MAX_DEPTH:
            return f"nested too deeply (a recipe has at most {MAX_DEPTH} levels)"
        if seen > MAX_NODES:
            return f"too many values ({MAX_NODES}+ once YAML aliases are expanded)"
        if isinstance(v, dict):
            stack += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            stack += [(x, d + 1) for x in v]
    return None


def read_recipe_text(path: Path) -> str:
    """The recipe file as text, or a UserError: missing, a directory, too big, not UTF-8, unreadable."""
    if not path.exists():
        raise UserError(f"{path}: recipe not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a recipe file", "pass the recipe's .yaml file")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes is too large for a recipe (limit 1 MiB)")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})", "save the recipe as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc.strerror})") from None


def parse_recipe_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{source}: not valid YAML{where}") from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply (a recipe has at most {MAX_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with sections {', '.join(('name', 'model') + STAGES[1:])}")
    why = _too_complex(data)
    if why:
        raise UserError(f"{source}: {why}")
    if any(not isinstance(k, str) for k in data):
        raise UserError(f"{source}: section names must be strings")
    return data


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    data = parse_recipe_yaml(read_recipe_text(path), str(path))
    data = apply_overrides(data, overrides or [])
    data = _resolve_paths(data, path.parent.resolve())
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(str(path), format_validation_error(err, Recipe)) from None


def validated(model: type[BaseModel], data: dict, what: str) -> Any:
    """Build a stage config from CLI options with the recipe's error format."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RecipeError(what, format_validation_error(err, model), "options") from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True, exclude_none=False), sort_keys=False)

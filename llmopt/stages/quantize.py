"""quantize: checkpoint → quantized checkpoint (RTN, GPTQ, AWQ int4/int8 weights; SmoothQuant W8A8).

Reads the unquantized checkpoint, tokenizes the calibration text with its tokenizer (default: the text
shipped with llmopt), runs the layer-by-layer driver (:mod:`llmopt.quant.calibrate`) and writes the
format of :mod:`llmopt.quant.format`. The manifest metadata carries the scheme, per-linear relative
output errors of the method and of RTN on the same calibration inputs, the calibration summary and the
time and peak memory it took.
"""

from __future__ import annotations

import hashlib
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from llmopt.artifact import Artifact
from llmopt.errors import UserError
from llmopt.models import presets
from llmopt.models.loader import DTYPES, load_model
from llmopt.models.registry import dims_of, spec_for
from llmopt.progress import Progress
from llmopt.quant.calibrate import quantize_model
from llmopt.quant.capture import calibration_ids
from llmopt.quant.format import SCHEME_FILE, is_quantized, save_quantized
from llmopt.recipe import QuantizeConfig
from llmopt.stages.base import Stage


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _calibration(config: QuantizeConfig, tokenizer, model: torch.nn.Module) -> tuple[torch.Tensor | None, dict]:
    cal = config.calibration
    path = Path(cal.text) if cal.text is not None else presets.DEFAULT_CALIB_TEXT
    if config.method == "rtn" and cal.text is None and (tokenizer is None or not path.exists()):
        return None, {"text": None, "note": "RTN needs no data; no tokenizer or text, so no errors recorded"}
    if not path.is_file():
        raise UserError(f"{path}: calibration text not found", "pass --calibration FILE (plain text)")
    if tokenizer is None:
        raise UserError("the checkpoint has no tokenizer files, so the calibration text cannot be tokenized",
                        "load a checkpoint that ships tokenizer.json (or use --method rtn without --calibration)")
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_pos is not None and cal.seq_len > max_pos:
        raise UserError(f"--seq-len {cal.seq_len} exceeds the model's {max_pos} positions")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = calibration_ids(text, tokenizer, cal.samples, cal.seq_len)
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(ids.max()) >= vocab:
        raise UserError(f"the tokenizer produced id {int(ids.max())} but the model has {vocab} embeddings",
                        "the checkpoint's tokenizer does not match its model")
    summary = {"text": str(path), "text_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
               "samples": cal.samples, "seq_len": cal.seq_len,
               "unique_windows": len({tuple(r.tolist()) for r in ids}),
               "distinct_tokens": int(ids.unique().numel())}
    return ids, summary


def run(config: QuantizeConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    src = inputs[0]
    if is_quantized(src.path) or src.stage == "quantize":
        raise UserError(f"{src.path}: is already a quantized checkpoint ({SCHEME_FILE} present)",
                        "quantize the unquantized checkpoint written by `llmopt load`")
    started = time.perf_counter()
    src_dtype = src.config.get("dtype", "float32") if isinstance(src.config, dict) else "float32"
    with progress.task("read checkpoint"):
        model, tokenizer = load_model(src.path, "float32")  # the math runs in float32
    spec = spec_for(model.config.model_type)
    with progress.task("tokenize calibration text"):
        ids, cal_summary = _calibration(config, tokenizer, model)

    result = quantize_model(model, config, ids, progress)
    result.calibration = {**cal_summary, **result.calibration}

    group_size = None if config.bits == 8 else config.group_size
    symmetric = True if config.method == "smoothquant" else config.symmetric
    scheme = {"method": config.method, "bits": config.bits, "group_size": group_size, "symmetric": symmetric,
              "ignore_patterns": list(config.ignore),
              "gptq": ({"damp": config.damp, "block_size": config.block_size, "act_order": config.act_order}
                       if config.method == "gptq" else None),
              "smoothquant_alpha": config.alpha if config.method == "smoothquant" else None}
    with progress.task("write quantized checkpoint"):
        if src_dtype in DTYPES and DTYPES[src_dtype] != torch.float32:
            model.to(DTYPES[src_dtype])  # float tensors keep the source dtype; QTensors are float32-derived
        full = save_quantized(model, result, out, scheme, source_dir=src.path)

    qbytes = (out / "model.safetensors").stat().st_size
    return {
        "architecture": spec.name,
        "dims": asdict(dims_of(model.config)),
        "scheme": {k: full[k] for k in ("method", "bits", "group_size", "symmetric", "activations")},
        "weight_dtype": full["weight"]["dtype"],
        "quantized_linears": len(result.qtensors),
        "ignored": full["ignored"],
        "embeddings": "float",
        "calibration": result.calibration,
        "error_summary": result.error_summary(),
        "errors": result.errors,
        "layer_seconds": result.layer_seconds,
        "time_s": round(time.perf_counter() - started, 3),
        "peak_rss_mb": _peak_rss_mb(),
        "weights_bytes": qbytes,
    }


STAGE = Stage(name="quantize", kind="checkpoint", version=1, config_model=QuantizeConfig, run=run,
              input_kinds=("checkpoint",), default_file=lambda config: presets.DEFAULT_CALIB_TEXT)

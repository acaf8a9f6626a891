"""quantize: checkpoint → quantized checkpoint (RTN, GPTQ, AWQ int4/int8 weights; SmoothQuant W8A8).

Never holds the model. RTN streams: each weight is read from the safetensors, quantized and written
(:func:`llmopt.quant.streaming.quantize_stream`; no model, no calibration). The calibrated methods — and RTN
with ``error_stats`` — run the layer-walking driver (:mod:`llmopt.quant.calibrate`) on a model skeleton
whose decoder layers stay on the meta device except the one being calibrated
(:class:`llmopt.quant.streaming.DiskLayers`). Output: the format of :mod:`llmopt.quant.format`, written
tensor by tensor. The manifest metadata carries the scheme, per-linear relative output errors of the
method and of RTN on the same calibration inputs (calibrated runs), the calibration summary including the
bytes of activations held, partial groups, and the time and peak memory it took.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from llmopt.artifact import Artifact
from llmopt.errors import UserError
from llmopt.estimates import quantize_estimate
from llmopt.resources import release_free_memory, return_freed_memory_promptly
from llmopt.models import presets
from llmopt.models.loader import (DTYPE_NAMES, assign, checked_names, empty_model, expected_tensors, load_tokenizer,
                                  open_weights, read_config)
from llmopt.models.registry import dims_of, spec_for
from llmopt.models.safetensors_io import TensorSpec
from llmopt.progress import Progress
from llmopt.quant.calibrate import outside_linears, quantize_model
from llmopt.quant.capture import calibration_ids
from llmopt.quant.format import SCHEME_FILE, QuantizedWriter, is_quantized, write_scheme
from llmopt.quant.method import method_for
from llmopt.quant.modules import is_ignored
from llmopt.quant.streaming import DiskLayers, quantize_stream
from llmopt.recipe import QuantizeConfig
from llmopt.stages.base import Stage


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _calibration(config: QuantizeConfig, tokenizer: Any, model_config: Any, vocab: int) -> tuple[torch.Tensor, dict]:
    cal = config.calibration
    path = Path(cal.text) if cal.text is not None else presets.DEFAULT_CALIB_TEXT
    if not path.is_file():
        raise UserError(f"{path}: calibration text not found", "pass --calibration FILE (plain text)")
    if tokenizer is None:
        raise UserError("the checkpoint has no tokenizer files, so the calibration text cannot be tokenized",
                        "load a checkpoint that ships tokenizer.json (or use --method rtn without --error-stats)")
    max_pos = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if max_pos is not None and cal.seq_len > max_pos:
        raise UserError(f"--seq-len {cal.seq_len} exceeds the model's {max_pos} positions")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = calibration_ids(text, tokenizer, cal.samples, cal.seq_len)
    if int(ids.max()) >= vocab:
        raise UserError(f"the tokenizer produced id {int(ids.max())} but the model has {vocab} embeddings",
                        "the checkpoint's tokenizer does not match its model")
    summary = {"text": str(path), "text_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
               "samples": cal.samples, "seq_len": cal.seq_len,
               "unique_windows": len({tuple(r.tolist()) for r in ids}),
               "distinct_tokens": int(ids.unique().numel())}
    return ids, summary


def _linears(skeleton: torch.nn.Module, spec: Any, num_layers: int, expected: dict, patterns: list[str]) -> tuple[dict, list]:
    """Quantized linear module → {out_features, in_features, bias, conv1d}, and the ignored ones."""
    names = [f"{spec.layers_path}.{i}.{lin}" for i in range(num_layers) for lin in spec.linears]
    names += outside_linears(skeleton, spec)
    linears, ignored = {}, []
    for name in names:
        if is_ignored(name, patterns):
            ignored.append(name)
            continue
        conv1d = type(skeleton.get_submodule(name)).__name__ == "Conv1D"
        shape = expected[f"{name}.weight"]
        out_f, in_f = (shape[1], shape[0]) if conv1d else shape
        linears[name] = {"out_features": out_f, "in_features": in_f, "bias": f"{name}.bias" in expected, "conv1d": conv1d}
    return linears, ignored


def run(config: QuantizeConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    src = inputs[0]
    if is_quantized(src.path) or src.stage == "quantize":
        raise UserError(f"{src.path}: is already a quantized checkpoint ({SCHEME_FILE} present)",
                        "quantize the unquantized checkpoint written by `llmopt load`")
    started = time.perf_counter()
    method = method_for(config)
    calibrated = method.calibrated or config.error_stats
    if calibrated:  # before the skeletons are built (their parameters pass through CPU allocations)
        return_freed_memory_promptly()  # one layer's working set at a time, not every layer's high-water mark
    with progress.task("read checkpoint headers"):
        model_config, spec = read_config(src.path)
        raw_config = json.loads((src.path / "config.json").read_text())
        source = open_weights(src.path)
        expected, tied = expected_tensors(model_config, spec)
        names = checked_names(source, expected, tied, src.path)
        skeleton = empty_model(model_config, spec)
        dims = dims_of(model_config)
        linears, ignored = _linears(skeleton, spec, dims.num_layers, expected, list(config.ignore))
        qweights = {f"{m}.weight" for m in linears}
        floats = [TensorSpec(n, source.info(n)[1], tuple(source.info(n)[0])) for n in names if n not in qweights]
        tied_head = next((m for m in linears if f"{m}.weight" in tied and f"{m}.weight" not in names), None)
    if calibrated:  # bad calibration input is refused before anything is written
        with progress.task("tokenize calibration text"):
            ids, cal_summary = _calibration(config, load_tokenizer(src.path), model_config, dims.vocab_size)
    writer = QuantizedWriter(out, floats, linears, method.bits, method.group_size, method.symmetric, method.activations)
    where = str(src.path)
    if not calibrated:
        result = quantize_stream(source, names, linears, tied_head, method, writer, progress, spec.layers_path)
        result.calibration = {"text": None, "note": "RTN streams the weights: no model, no calibration data "
                                                    "(error_stats: true measures per-linear errors)"}
    else:
        release_free_memory()
        layer_prefix = spec.layers_path + "."
        outside = [n for n in names if not n.startswith(layer_prefix)
                   and not any(n == f"{m}.weight" for m in ignored)]
        assign(skeleton, source, outside, torch.float32, where)  # embeddings (+ final norm / lm_head)
        store = DiskLayers(source, writer, spec.layers_path, free_embeddings=tied_head is None)
        result = quantize_model(skeleton, config, ids, progress, store=store)
        result.calibration = {**cal_summary, **result.calibration}
        for n in names:
            if not n.startswith(layer_prefix) and n in writer.floats:
                writer.write_float(n, source.get(n))
        for name, qt in list(result.qtensors.items()):  # outside the layers (lm_head), when quantized
            writer.write_linear(name, result.qtensors.pop(name), result.act_qparams.get(name))
    result.ignored = sorted(set(result.ignored) | set(ignored))
    writer.close()

    scheme = {"method": config.method, "bits": config.bits, "group_size": method.group_size,
              "symmetric": method.symmetric, "ignore_patterns": list(config.ignore),
              "gptq": ({"damp": config.damp, "block_size": config.block_size, "act_order": config.act_order}
                       if config.method == "gptq" else None),
              "smoothquant_alpha": config.alpha if config.method == "smoothquant" else None}
    with progress.task("write quantization.json"):
        full = write_scheme(out, writer, result, scheme, raw_config, src.path)
    dtypes = sorted({DTYPE_NAMES.get(s.dtype, str(s.dtype)) for s in floats})
    return {
        "architecture": spec.name,
        "dims": asdict(dims),
        "scheme": {k: full[k] for k in ("method", "bits", "group_size", "symmetric", "activations")},
        "weight_dtype": full["weight"]["dtype"],
        "float_dtypes": dtypes,
        "streaming": "per layer (calibrated)" if calibrated else "per tensor (no model)",
        "quantized_linears": len(writer.modules),
        "partial_groups": full["partial_groups"],
        "ignored": full["ignored"],
        "embeddings": "float",
        "untied_lm_head": result.untied_lm_head,
        "calibration": result.calibration,
        "error_summary": result.error_summary(),
        "errors": result.errors,
        "layer_seconds": result.layer_seconds,
        "time_s": round(time.perf_counter() - started, 3),
        "peak_rss_mb": _peak_rss_mb(),
        "weights_bytes": writer.bytes,
    }


STAGE = Stage(name="quantize", kind="checkpoint", version=4, config_model=QuantizeConfig, run=run,
              input_kinds=("checkpoint",), default_file=lambda config: presets.DEFAULT_CALIB_TEXT,
              estimate=quantize_estimate)

"""Estimators of each stage's peak RSS, disk and time, from the config and file headers only.

Each is a sum of named terms (kept in ``basis`` so a wrong estimate shows which term was wrong):
the process baseline (RSS now: Python, torch, onnx already imported), the stage's resident model bytes,
and its working set (the few tensors it holds at once). The factors were measured on this project's
machines (docs/scale.md) and are checked against every run: the manifest records estimate and measured
peak side by side (``metadata.resources``).
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx

from llmopt.artifact import Artifact, lineage
from llmopt.resources import Estimate, rss

MB = 1 << 20
_OUT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_FLOAT = {"F32", "F16", "BF16", "F64"}
_NOT_QUANTIZED = ("model.embed", "lm_head", "transformer.wte", "transformer.wpe", "model.norm")

LOAD_TENSOR_COPIES = 3.2         # read + finite check + converted / serialized copy of the largest tensor (7B bf16: 3.18x)
RTN_LINEAR_COPIES = 4.2          # float32 weight, scaled, rounded and packed copies of the largest linear (7B: 4.2x)
EXPORT_IMPORTS = 225 * MB        # onnxscript / onnx-ir / torch.export imported and warmed, 3 traced layers
EXPORT_PER_LAYER = 1 * MB        # a replicated layer's graph (nodes, value infos; its weights stream)
EXPORT_TENSOR_COPIES = 2.0       # the largest float tensor (an embedding) read in its stored dtype + converted
# fitted 2026-12-02 (peak above the process's start) after export began tracing 3 layers and replicating the
# rest: 7B bf16 RTN int4 1235 MiB measured (1257 estimated), bench-246m int4 510 (491), SmolLM2 fp32 448 (471)
ORT_IMPORTS = 150 * MB
ORT_SESSION = 1.3                # a CPU session holds its initializers (+ prepacked copies); measured 1.28x
BUILD_TENSOR_COPIES = 4.0        # packing / lm_head quantization temporaries of the largest tensor
REF_ACTIVATIONS = 64 * MB


def _checkpoint_sizes(path: Path, out_dtype: str | None = None) -> dict:
    from llmopt.models.safetensors_io import ITEM_BYTES, SafetensorsReader

    t = SafetensorsReader.of(path)
    floats = [i for i in t.entries.values() if i.dtype in _FLOAT]

    def scale(i) -> int:  # noqa: ANN001 - bytes of the tensor once converted to the output dtype
        return i.nbytes if out_dtype is None else i.nbytes // ITEM_BYTES[i.dtype] * _OUT_BYTES[out_dtype]

    largest = max((scale(i) for i in floats), default=0)
    return {"stored_bytes": t.nbytes, "float_bytes_out": sum(scale(i) for i in floats),
            "int_bytes": sum(i.nbytes for i in t.entries.values() if i.dtype not in _FLOAT),
            "largest_tensor_out": largest, "tensors": len(t.entries)}


def _layers(path: Path) -> int:
    from llmopt.readers import read_json

    cfg = read_json(Path(path) / "config.json", "config.json")
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0
    return layers if isinstance(layers, int) and layers >= 0 else 0  # the stage itself reports a bad value


def load_estimate(config, inputs: list[Artifact]) -> Estimate | None:  # noqa: ANN001
    """A local safetensors checkpoint (one file or shards): read, checked and written one tensor at a time.
    None for presets and GGUF files (small, or dequantized through their own reader)."""
    src = Path(config.source)
    if config.source.startswith("preset:") or not (src / "config.json").is_file() or \
            not ((src / "model.safetensors").is_file() or (src / "model.safetensors.index.json").is_file()):
        return None
    s = _checkpoint_sizes(src, None if config.dtype == "auto" else config.dtype)
    base = rss()
    work = int(LOAD_TENSOR_COPIES * s["largest_tensor_out"])
    disk = s["float_bytes_out"] + s["int_bytes"]
    return Estimate(base + work, disk, round(5 + (s["stored_bytes"] + disk) / (200 * MB), 1),
                    {"baseline": base, "working_set": work, **s})


def quantize_estimate(config, inputs: list[Artifact]) -> Estimate | None:  # noqa: ANN001
    """RTN streams one linear at a time; the calibrated methods are estimated from their resident model
    parts only where measured (None otherwise: the run records its measured peak)."""
    if config.method != "rtn" or config.error_stats:
        return None
    from llmopt.models.safetensors_io import SafetensorsReader

    ckpt = inputs[0].path
    s = _checkpoint_sizes(ckpt)
    info = SafetensorsReader.of(ckpt).entries
    is_linear = {n: n.endswith(".weight") and len(i.shape) == 2 and not n.startswith(_NOT_QUANTIZED)
                 for n, i in info.items()}
    linears = [math.prod(info[n].shape) for n, lin in is_linear.items() if lin]
    group = config.group_size or 1 << 30
    codes = sum(n * config.bits // 8 + 4 * -(-n // min(group, n)) for n in linears)  # + one float32 scale per group
    kept = sum(i.nbytes for n, i in info.items() if not is_linear[n])  # written as they are
    base = rss()
    linear = 4 * max(linears, default=0)
    work = int(max(RTN_LINEAR_COPIES * linear, LOAD_TENSOR_COPIES * s["largest_tensor_out"]))
    return Estimate(base + work, codes + kept, round(5 + s["stored_bytes"] / (100 * MB), 1),
                    {"baseline": base, "working_set": work, "largest_linear_float32": linear, **s})


def export_estimate(config, inputs: list[Artifact]) -> Estimate:  # noqa: ANN001
    ckpt = inputs[0].path
    s = _checkpoint_sizes(ckpt, config.dtype)
    layers = _layers(ckpt)
    base = rss()
    trace = EXPORT_IMPORTS + layers * EXPORT_PER_LAYER
    work = int(EXPORT_TENSOR_COPIES * s["largest_tensor_out"])
    disk = s["float_bytes_out"] + s["int_bytes"]
    seconds = 8 + disk / (40 * MB)  # 7B int4 126 s, SmolLM2 14 s, bench-246m 13 s (Sapphire Rapids, 2 cores)
    return Estimate(base + trace + work, disk, round(seconds, 1),
                    {"baseline": base, "trace": trace, "working_set": work, **s, "layers": layers})


def onnx_sizes(directory: Path) -> dict:
    """Initializer bytes of an ONNX artifact from its graph's external-data entries (data not read)."""
    model = onnx.load(str(Path(directory) / "model.onnx"), load_external_data=False)
    total, largest = 0, 0
    for t in model.graph.initializer:
        n = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        if n is None:
            n = len(t.raw_data)
        total += n
        largest = max(largest, n)
    return {"initializer_bytes": total, "largest_initializer": largest}


def build_estimate(config, inputs: list[Artifact]) -> Estimate:  # noqa: ANN001
    s = onnx_sizes(inputs[0].path)
    base = rss()
    model = s["initializer_bytes"]
    work = int(BUILD_TENSOR_COPIES * s["largest_initializer"])
    resident = int(ORT_SESSION * model)  # the load check of the engine; the rewrite streams (llmopt.ort.store)
    disk = model + (model if config.device == "cpu" else 0)  # the intermediate rewritten data, then the engine
    seconds = 5 + model / (100 * MB)
    return Estimate(base + ORT_IMPORTS + max(work, resident), disk, round(seconds, 1),
                    {"baseline": base, "ort_imports": ORT_IMPORTS, "session": resident, "rewrite_working_set": work, **s})


def validate_estimate(config, inputs: list[Artifact]) -> Estimate:  # noqa: ANN001
    art = inputs[0]
    refs = [a for a in inputs[1:] if a.kind == "checkpoint"]
    ref_bytes = max((_checkpoint_sizes(a.path)["stored_bytes"] for a in refs), default=0)
    onnx_dir = next((a.path for a in lineage(art) if (a.path / "model.onnx").exists()), art.path)
    test = ORT_SESSION * onnx_sizes(onnx_dir)["initializer_bytes"] if (onnx_dir / "model.onnx").exists() else 0
    vocab_logits = 0
    base = rss()
    peak = base + ORT_IMPORTS + REF_ACTIVATIONS + max(ref_bytes, int(test)) + vocab_logits
    seconds = 20 + config.eval_tokens * 0.01 * (1 + ref_bytes / (1000 * MB))
    return Estimate(int(peak), 0, round(seconds, 1),
                    {"baseline": base, "reference_bytes": ref_bytes, "artifact_session": int(test)})

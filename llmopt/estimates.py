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
_EMBEDDINGS = ("model.embed", "transformer.wte", "transformer.wpe")
_NOT_QUANTIZED = (*_EMBEDDINGS, "lm_head", "model.norm")

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
    """RTN streams one linear at a time; the calibrated methods hold one decoder layer (:func:`calibrated_estimate`)."""
    from llmopt.models.safetensors_io import SafetensorsReader

    ckpt = inputs[0].path
    if config.method != "rtn" or config.error_stats:
        return calibrated_estimate(config, ckpt)
    s = _checkpoint_sizes(ckpt)
    linears, written = _quantized_output(SafetensorsReader.of(ckpt).entries, config)
    base = rss()
    linear = 4 * max(linears, default=0)
    work = int(max(RTN_LINEAR_COPIES * linear, LOAD_TENSOR_COPIES * s["largest_tensor_out"]))
    return Estimate(base + work, written, round(5 + s["stored_bytes"] / (100 * MB), 1),
                    {"baseline": base, "working_set": work, "largest_linear_float32": linear, **s})


def _quantized_output(info: dict, config) -> tuple[list[int], int]:  # noqa: ANN001
    """Element counts of the linears that get quantized, and the bytes the quantized checkpoint will hold:
    their codes plus one float32 scale per group, and every other tensor as it is."""
    is_linear = {n: n.endswith(".weight") and len(i.shape) == 2 and not n.startswith(_NOT_QUANTIZED)
                 for n, i in info.items()}
    linears = [math.prod(info[n].shape) for n, lin in is_linear.items() if lin]
    group = config.group_size or 1 << 30
    codes = sum(n * config.bits // 8 + 4 * -(-n // min(group, n)) for n in linears)
    return linears, codes + sum(i.nbytes for n, i in info.items() if not is_linear[n])


# The calibrated methods' working set of one linear group with input width K and float32 weights G bytes:
# (copies of the K x K float32 Hessian, copies of G). GPTQ: the statistics' H and the factorization's
# in-place working copy; W's original, its stacked scratch and the dequantized result. AWQ: H and the
# scale / clip searches' fake-quantized copies. SmoothQuant and RTN-with-errors: H, the folded and the
# dequantized weights.
GROUP_COPIES = {"gptq": (2.0, 3.0), "awq": (1.0, 4.0), "smoothquant": (1.0, 3.0), "rtn": (1.0, 3.0)}
CALIB_PROCESS = 384 * MB         # the interpreter once torch, transformers' modeling code and the tokenizer are in
FORWARD_TENSORS = 3.0            # a batch's MLP intermediates (gate, up, their product) of tokens x ffn
ATTN_TENSORS = 2.0               # a batch's attention scores and probabilities, heads x seq x seq per sample
# time: GPTQ's column loops and block updates grow with in² x out per linear, the calibration forwards with
# linear parameters x tokens; fitted on SmolLM2-135M GPTQ (59 s at 8 x 256 tokens, 107 s at 32 x 256; AMD Zen 5,
# quiet), predicting 1566 s for the 1.1B shape at 16 x 256 (measured ~1280 s from its quiet layers' 57 s each)
CALIB_S_PER_CUBE = 4.4e-10
CALIB_S_PER_PARAM_TOKEN = 7.4e-11
METHOD_TIME = {"gptq": 1.0, "awq": 2.5}  # AWQ: its grid searches (SmolLM2: 513 s vs GPTQ's 200 s, same run)


def calibrated_estimate(config, ckpt: Path) -> Estimate:  # noqa: ANN001
    """GPTQ / AWQ / SmoothQuant / RTN with errors (:mod:`llmopt.quant.calibrate`): the larger of two phases.
    Capture: the float32 embeddings (and whatever else outside the layers is used) and layer 0's calibration
    inputs. Layer: one decoder layer in float32, the calibration hidden states of a layer boundary plus one
    batch, one batch's forward intermediates, and the largest linear group's Hessian and weight copies."""
    from llmopt.models.loader import read_config
    from llmopt.models.registry import dims_of
    from llmopt.models.safetensors_io import SafetensorsReader
    from llmopt.quant.calibrate import BATCH_TOKENS
    from llmopt.quant.modules import is_ignored, sublayer_groups

    model_config, spec = read_config(Path(ckpt))
    dims = dims_of(model_config)
    info = SafetensorsReader.of(ckpt).entries
    f32 = {n: 4 * math.prod(i.shape) for n, i in info.items() if i.dtype in _FLOAT}
    layer0 = f"{spec.layers_path}.0."
    inside = spec.layers_path + "."
    ignored = list(config.ignore)
    outside = sum(b for n, b in f32.items() if not n.startswith(inside) and not is_ignored(n.rsplit(".", 1)[0], ignored))
    embeddings = sum(b for n, b in f32.items() if n.startswith(_EMBEDDINGS))
    tied = bool(getattr(model_config, "tie_word_embeddings", False)) and not any(n.startswith("lm_head") for n in info)
    kept = outside - (0 if tied and not is_ignored("lm_head", ignored) else embeddings)
    layer = sum(b for n, b in f32.items() if n.startswith(layer0))

    hess_copies, weight_copies = GROUP_COPIES.get(config.method, GROUP_COPIES["rtn"])
    group = ffn = 0
    for grp in sublayer_groups(spec):
        shapes = [info[f"{layer0}{lin}.weight"].shape for lin in grp if f"{layer0}{lin}.weight" in info]
        if not shapes:
            continue
        k = shapes[0][0] if spec.conv1d else shapes[0][1]  # the group's input width; the widest is the MLP's
        ffn = max(ffn, k)
        group = max(group, int(hess_copies * 4 * k * k + weight_copies * sum(4 * math.prod(sh) for sh in shapes)))

    cal = config.calibration
    tokens = cal.samples * cal.seq_len
    per_batch = min(cal.samples, max(1, BATCH_TOKENS // cal.seq_len))
    batch_tokens = per_batch * cal.seq_len
    acts = 4 * dims.hidden_size * (tokens + batch_tokens)
    forward = int(4 * (FORWARD_TENSORS * batch_tokens * ffn + ATTN_TENSORS * per_batch * dims.num_heads * cal.seq_len ** 2))
    capture = outside + acts + 4 * dims.hidden_size * batch_tokens
    walk = kept + layer + acts + forward + group

    weights = [i.shape for n, i in info.items() if n.startswith(inside) and n.endswith(".weight") and len(i.shape) == 2]
    cube = sum(sh[0] * sh[1] * (sh[0] if spec.conv1d else sh[1]) for sh in weights)
    work = cube * CALIB_S_PER_CUBE + sum(math.prod(sh) for sh in weights) * tokens * CALIB_S_PER_PARAM_TOKEN
    seconds = 5 + work * METHOD_TIME.get(config.method, 1.0)
    base = rss()
    imports = max(0, CALIB_PROCESS - base)  # a `convert` process has them already
    return Estimate(base + imports + max(capture, walk), _quantized_output(info, config)[1], round(seconds, 1),
                    {"baseline": base, "imports": imports, "capture_phase": capture, "layer_phase": walk,
                     "outside_layers_float32": outside, "kept_while_walking": kept, "layer_float32": layer,
                     "activations": acts, "batch_forward": forward, "largest_group": group,
                     "layers": dims.num_layers, "calibration_tokens": tokens,
                     "stored_bytes": sum(i.nbytes for i in info.values())})


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

"""export: checkpoint → ONNX with the KV cache as explicit inputs/outputs and dynamic axes."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Callable

import onnx
import torch

from llmopt.artifact import Artifact
from llmopt.export_graph import DecoderWithCache, dynamic_shapes, example_inputs, io_description
from llmopt.models.loader import DTYPES, load_model
from llmopt.models.registry import dims_of
from llmopt.progress import Progress
from llmopt.quant.format import is_quantized
from llmopt.recipe import ExportConfig
from llmopt.stages.base import Stage

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def _name_dims(model: onnx.ModelProto, io: dict) -> None:
    """Give every graph input/output the symbolic dim names of io.json (the exporter writes 'past + seq')."""
    spec = {t["name"]: t["shape"] for t in io["inputs"] + io["outputs"]}
    for value in list(model.graph.input) + list(model.graph.output):
        shape = spec.get(value.name)
        if shape is None:
            raise RuntimeError(f"exported graph has unexpected I/O {value.name}")
        dims = value.type.tensor_type.shape.dim
        for d, want in zip(dims, shape):
            if isinstance(want, str):
                d.ClearField("dim_value")
                d.dim_param = want


def export_model(model: torch.nn.Module, out: Path, opset: int, dtype: str,
                 quantization: dict | None = None,
                 rewrite: Callable[[onnx.ModelProto], dict] | None = None) -> dict:
    dims = dims_of(model.config)
    io = io_description(dims, dtype, opset, quantization)
    wrapper = DecoderWithCache(model).eval()
    args = example_inputs(dims, DTYPES[dtype])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes(dims),
            input_names=[t["name"] for t in io["inputs"]], output_names=[t["name"] for t in io["outputs"]],
            verbose=False, report=False, optimize=True)
    tmp = out / "raw.onnx"
    program.save(str(tmp), external_data=True)
    proto = onnx.load(str(tmp), load_external_data=True)
    _name_dims(proto, io)
    if rewrite is not None:
        io["rewrite"] = rewrite(proto)
    proto.producer_name = "llmopt"
    onnx.save_model(proto, str(out / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    tmp.unlink()
    for leftover in out.glob("raw.onnx*"):
        leftover.unlink()
    onnx.checker.check_model(str(out / MODEL_FILE), full_check=False)
    (out / "io.json").write_text(json.dumps(io, indent=2))
    return io


def _quantized(path: Path, dtype: str) -> tuple[torch.nn.Module, dict, Callable]:
    """The dequantized model to trace, the scheme for io.json, and the QDQ rewrite of its weights."""
    from llmopt.export_quant import QWeight, rewrite_qdq
    from llmopt.quant.format import load_activation_qparams, load_dequantized, load_qtensors, read_scheme

    scheme = read_scheme(path)
    model = load_dequantized(path, activations=False).to(DTYPES[dtype]).eval()
    acts = load_activation_qparams(path)
    weights = {}
    for name, qt in load_qtensors(path).items():
        w = model.get_submodule(name).weight.detach()
        deq = w.t() if scheme["modules"][name].get("conv1d") else w
        act = acts.get(name, {})
        weights[name] = QWeight(
            q=qt.q.numpy(), scale=qt.scale.numpy(), zero_point=None if qt.zero_point is None else qt.zero_point.numpy(),
            bits=qt.bits, group_size=qt.group_size, dequantized=deq.numpy(),
            input_scale=act.get("scale"), input_zero_point=act.get("zero_point"), input_dtype=act.get("dtype", "uint8"))
    summary = {k: scheme.get(k) for k in ("method", "bits", "group_size", "symmetric", "activations")}
    return model, summary, lambda proto: rewrite_qdq(proto, weights, dtype)


def run(config: ExportConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    ckpt = inputs[0]
    quantization, rewrite = None, None
    with progress.task("read checkpoint"):
        if is_quantized(ckpt.path):
            model, quantization, rewrite = _quantized(ckpt.path, config.dtype)
        else:
            model, _ = load_model(ckpt.path, config.dtype)
    with progress.task(f"export ONNX (opset {config.opset}, {config.dtype})"):
        io = export_model(model, out, config.opset, config.dtype, quantization, rewrite)
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": config.opset, "dtype": config.dtype, "nodes": len(graph.graph.node),
            "op_types": dict(sorted(ops.items())), "num_layers": io["num_layers"],
            "architecture": ckpt.metadata.get("architecture"), "quantization": quantization,
            "rewrite": io.get("rewrite")}


STAGE = Stage(name="export", kind="onnx", version=1, config_model=ExportConfig, run=run,
              input_kinds=("checkpoint",), packages=("torch", "transformers", "onnx", "onnxscript", "onnx-ir"))

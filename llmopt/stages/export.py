"""export: checkpoint → ONNX with the KV cache as explicit inputs/outputs and dynamic axes, streamed.

The structure is traced without reading any weight (:mod:`llmopt.export.trace`), the checkpoint's
tensors are attached lazily (:mod:`llmopt.export.bind`) and written into the external-data file one at a
time, so the stage holds about one tensor of weights whatever the model size.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from llmopt.artifact import Artifact
from llmopt.estimates import export_estimate
from llmopt.export.bind import bind_weights, quantize_activations
from llmopt.export.trace import empty_model, trace_decoder
from llmopt.models.safetensors_io import SafetensorsReader
from llmopt.export.wrapper import io_description
from llmopt.models.loader import DTYPES, read_config
from llmopt.models.registry import dims_of
from llmopt.progress import Progress
from llmopt.quant.format import is_quantized, read_scheme
from llmopt.recipe import ExportConfig
from llmopt.stages.base import Stage

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def _name_dims(model: ir.Model, io: dict) -> None:
    """Give every graph input/output the symbolic dim names of io.json (the exporter writes 'past + seq')."""
    spec = {t["name"]: t["shape"] for t in io["inputs"] + io["outputs"]}
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        shape = spec.get(value.name)
        if shape is None:
            raise RuntimeError(f"exported graph has unexpected I/O {value.name}")
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in shape])


def _drop_identity_reshapes(model: ir.Model) -> int:
    """Remove Reshapes whose input and output have the same fully named shape (a trace may keep
    transformers' ``reshape(batch, -1, q_len, head_dim)`` after attention, which a real-tensor trace drops)."""
    dropped = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None or x.shape is None or y.shape is None or y.is_graph_output():
            continue
        dims_x, dims_y = list(x.shape), list(y.shape)
        known = all(isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value) for d in dims_x)
        if known and [str(d) for d in dims_x] == [str(d) for d in dims_y]:
            ir.convenience.replace_all_uses_with(y, x)
            model.graph.remove(node, safe=True)
            dropped += 1
    return dropped


def _optimizer_passes() -> ir.passes.Sequential:
    """What ``onnxscript.optimizer.optimize_ir`` (the exporter's ``optimize=True``) runs, less the SlicesSplit
    rewrite: its matcher lists every node of the graph for each Slice it tries, O(nodes x slices), which
    was half of a 30-layer export; the graphs it would rewrite (rotate_half) are fused into
    RotaryEmbedding afterwards anyway."""
    import onnx_ir.passes.common as common
    import onnxscript.rewriter
    from onnxscript.optimizer import _constant_folding

    rules = [r for r in onnxscript.rewriter._DEFAULT_REWRITE_RULES if r.name != "SlicesSplit"]
    fold = _constant_folding.FoldConstantsPass(
        shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT)
    return ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([fold, onnxscript.rewriter.RewritePass(rules),
                               common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                               common.RemoveUnusedOpsetsPass()], steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass())


def _optimize(model: ir.Model) -> None:
    """Constant folding and the fusions the exporter's optimizer applies (RMSNormalization, RotaryEmbedding);
    it folds only small constants, so the lazy weights stay unread."""
    import onnxscript.rewriter.onnx_fusions

    _optimizer_passes()(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    if _drop_identity_reshapes(model):
        _optimizer_passes()(model)  # drops the shape computations that fed them


def export_checkpoint(path: Path, out: Path, opset: int, dtype: str, progress: Progress) -> dict:
    config, spec = read_config(path)
    tensors = SafetensorsReader.of(path)
    scheme = read_scheme(path) if is_quantized(path) else None
    quantization = None if scheme is None else {k: scheme.get(k) for k in
                                                ("method", "bits", "group_size", "symmetric", "activations")}
    dims = dims_of(config)
    io = io_description(dims, dtype, opset, quantization)
    with progress.task(f"trace the graph (opset {opset}, {dtype}, no weights)"):
        graph, traced = trace_decoder(config, spec, opset, DTYPES[dtype])
    model = empty_model(config, spec, DTYPES[dtype])
    bound = bind_weights(graph, model, tensors, scheme)
    bound["traced_layers"] = traced
    del model
    _optimize(graph)
    bound["activation_qdq"] = quantize_activations(graph, tensors, scheme)
    _name_dims(graph, io)
    graph.producer_name = "llmopt"
    if scheme is not None:
        io["rewrite"] = {k: bound[k] for k in ("quantized_matmuls", "activation_qdq")}
    n = len(graph.graph.initializers)
    with progress.task("write initializers (one tensor at a time)", total=n) as advance:
        ir.save(graph, out / MODEL_FILE, external_data=DATA_FILE, size_threshold_bytes=1024,
                callback=lambda tensor, info: advance())
    onnx.checker.check_model(str(out / MODEL_FILE), full_check=False)
    (out / "io.json").write_text(json.dumps(io, indent=2))
    return {"io": io, "bound": bound}


def run(config: ExportConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    ckpt = inputs[0]
    with torch.no_grad():
        done = export_checkpoint(ckpt.path, out, config.opset, config.dtype, progress)
    io, bound = done["io"], done["bound"]
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": config.opset, "dtype": config.dtype, "nodes": len(graph.graph.node),
            "op_types": dict(sorted(ops.items())), "num_layers": io["num_layers"],
            "architecture": ckpt.metadata.get("architecture"), "quantization": io["quantization"],
            "rewrite": io.get("rewrite"), "shared_initializers": bound["shared"],
            "transposed_weights": bound["transposed"], "traced_layers": bound["traced_layers"]}


STAGE = Stage(name="export", kind="onnx", version=3, config_model=ExportConfig, run=run,
              input_kinds=("checkpoint",), packages=("torch", "transformers", "onnx", "onnxscript", "onnx-ir"),
              estimate=export_estimate)

"""Attach the checkpoint's weights to a traced graph without loading them.

Every initializer of the traced graph becomes an ``onnx_ir.LazyTensor`` that reads its tensor from the
checkpoint (converting the dtype, e.g. bf16 → float32) only when the model is saved, so the external data
is written one tensor at a time. On the way:

- ``Transpose(W) → MatMul`` of a linear becomes ``MatMul`` on an initializer that holds ``W^T`` (written
  transposed), so no runtime Transpose and no second copy;
- a tied embedding stays ONE initializer, read by the ``Gather`` and, through its ``Transpose``, by the
  lm_head ``MatMul`` (the ONNX Runtime build turns that pair into one kernel reading the same weight);
- a quantized linear's weight is replaced by DequantizeLinear of its integer weight (:mod:`llmopt.export.qdq`).
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from llmopt.errors import UserError
from llmopt.export.qdq import activation_qdq, dequantized_weight
from llmopt.export.trace import PREFIX, aliases, real_buffers
from llmopt.models.safetensors_io import SafetensorsReader

_TORCH = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
          ir.DataType.INT64: torch.int64}


def _is_weight_transpose(node: ir.Node) -> bool:
    perm = node.attributes.get("perm")
    return node.op_type == "Transpose" and perm is not None and list(perm.as_ints()) == [1, 0]


def _reader(tensors: SafetensorsReader, key: str, dtype: ir.DataType, transpose: bool):  # noqa: ANN202
    def read() -> ir.Tensor:
        t = tensors.get(key)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{tensors.directory}: tensor {key} contains NaN or Inf values")
        t = t.to(_TORCH[dtype])
        if transpose:
            t = t.T
        return ir.tensor(t.contiguous().numpy(), name=key)

    return read


def _lazy(tensors: SafetensorsReader, key: str, name: str, dtype: ir.DataType, shape: list[int],
          transpose: bool = False) -> ir.LazyTensor:
    return ir.LazyTensor(_reader(tensors, key, dtype, transpose), dtype=dtype, shape=ir.Shape(shape), name=name)


def bind_weights(model: ir.Model, torch_model: torch.nn.Module, tensors: SafetensorsReader,
                 scheme: dict | None = None) -> dict:
    """Give every initializer of ``model`` (traced from ``torch_model`` on meta) its checkpoint data, lazily."""
    graph = model.graph
    opset = graph.opset_imports.get("", 0)
    buffers = real_buffers(torch_model)
    alias = aliases(torch_model)
    qmods = (scheme or {}).get("modules", {})
    summary = {"initializers": 0, "transposed": 0, "quantized_matmuls": 0, "activation_qdq": 0, "shared": []}
    for name, value in list(graph.initializers.items()):
        key = name[len(PREFIX):] if name.startswith(PREFIX) else name
        uses = list(value.uses())
        transposes = [u.node for u in uses]
        folds = bool(uses) and all(_is_weight_transpose(n) for n in transposes)
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in qmods:
            b, dq = dequantized_weight(graph, tensors, module, qmods[module], _float_type(graph), opset)
            first = transposes[0] if folds else uses[0].node
            graph.insert_before(first, dq)
            for t in [t.outputs[0] for t in transposes] if folds else [value]:
                ir.convenience.replace_all_uses_with(t, b)
            if folds:
                for t in transposes:
                    graph.remove(t, safe=True)
            graph.initializers.pop(name)
            summary["quantized_matmuls"] += 1
            continue
        source = next((k for k in alias.get(key, [key]) if k in tensors), None)
        if source is not None:
            shape = list(tensors.info(source)[0])
            if [d for d in value.shape] != shape:
                raise UserError(f"{tensors.directory}: tensor {source} has shape {tuple(shape)}, config expects "
                                f"{tuple(value.shape)}", "the weights do not match config.json")
            if len(alias.get(key, [])) > 1:  # tied: one initializer, named after the first (the embedding)
                key = alias[key][0]
                summary["shared"].append(key)
            if folds:
                t_value = ir.Value(name=f"{key}.T", type=value.type, shape=ir.Shape(shape[::-1]),
                                   const_value=_lazy(tensors, source, f"{key}.T", value.dtype, shape[::-1], True))
                graph.register_initializer(t_value)
                for t in transposes:
                    ir.convenience.replace_all_uses_with(t.outputs[0], t_value)
                    graph.remove(t, safe=True)
                graph.initializers.pop(name)
                summary["transposed"] += 1
            else:
                value.name = key
                value.const_value = _lazy(tensors, source, key, value.dtype, shape)
        elif key in buffers:
            value.name = key
            value.const_value = ir.tensor(buffers[key].to(_TORCH[value.dtype]).contiguous().numpy(), name=key)
        else:
            raise UserError(f"{tensors.directory}: missing tensor {key}", "the weights do not match config.json")
        summary["initializers"] += 1
    return summary


def quantize_activations(model: ir.Model, tensors: SafetensorsReader, scheme: dict | None) -> int:
    """W8A8: QuantizeLinear → DequantizeLinear in front of each activation-quantized linear's MatMul. Run after
    the optimizer, which would merge the identical Q/DQ of sibling linears (q/k/v) into one."""
    graph = model.graph
    by_name = {n.name: n for n in graph}
    done = 0
    for module, info in ((scheme or {}).get("modules") or {}).items():
        if not info.get("activation"):
            continue
        dq = by_name[f"/{module}/weight/DequantizeLinear"]
        for use in list(dq.outputs[0].uses()):
            graph.insert_before(use.node, activation_qdq(graph, tensors, module, use.node, _float_type(graph)))
        done += 1
    return done


def _float_type(graph: ir.Graph) -> ir.DataType:
    """The graph's float dtype (that of its logits output)."""
    return graph.outputs[0].dtype

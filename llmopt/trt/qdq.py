"""TensorRT's explicit-quantization rules, checked on the ONNX before building (no TensorRT needed).

TensorRT docs, "Working with Quantized Types": quantization is symmetric -- quantized values are signed
INT8, INT4 (weight-only), FP8 E4M3 or FP4 E2M1, and dequantizing is only a multiplication, so every zero
point must be 0. An ONNX ``QuantizeLinear`` with a uint8 zero point (or none and no ``output_dtype``,
which means uint8) or a non-zero zero point would fail in the parser or the builder; say so first.

One exact rewrite is applied first: a uint8 zero point of 128 is the same quantizer as an int8 zero point
of 0 (``clamp(round(x/s) + 128, 0, 255) - 128 == clamp(round(x/s), -128, 127)``, both round half to even),
which is how llmopt's W8A8 export stores activations for ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

ALLOWED = {TensorProto.INT8: "INT8", TensorProto.INT4: "INT4"}
for _name in ("FLOAT8E4M3FN", "FLOAT4E2M1"):
    if hasattr(TensorProto, _name):
        ALLOWED[getattr(TensorProto, _name)] = _name


def _type_name(t: int) -> str:
    return TensorProto.DataType.Name(t)


QDQ = ("QuantizeLinear", "DequantizeLinear")


def int8_from_uint8(model: onnx.ModelProto) -> int:
    """Rewrite, in place, inline uint8 zero points that are all 128 and feed only Q/DQ as int8 zeros."""
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, i))
    changed = 0
    for t in model.graph.initializer:
        consumers = uses.get(t.name, [])
        if t.data_type != TensorProto.UINT8 or uses_external_data(t) or not consumers:
            continue
        if any(op not in QDQ or i != 2 for op, i in consumers):
            continue
        values = numpy_helper.to_array(t)
        if np.all(values == 128):
            t.CopyFrom(numpy_helper.from_array(np.zeros(values.shape, np.int8), t.name))
            changed += 1
    return changed


def qdq_problems(model: onnx.ModelProto, base_dir: Path) -> list[str]:
    """One line per Q/DQ node TensorRT cannot take (empty when the graph is fine or has no Q/DQ)."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    problems = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in QDQ:
            continue
        zp = tensors.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "QuantizeLinear":
            out_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            qtype = zp.data_type if zp is not None else (out_dtype or TensorProto.UINT8)
        elif node.input[0] in tensors:
            qtype = tensors[node.input[0]].data_type
        else:
            qtype = zp.data_type if zp is not None else None  # fed by a QuantizeLinear, checked there
        label = node.name or f"{node.op_type}({node.input[0]})"
        if qtype is not None and qtype not in ALLOWED:
            problems.append(f"{label}: quantized type {_type_name(qtype)}; TensorRT takes signed "
                            f"{'/'.join(ALLOWED.values())} only")
        if zp is not None:
            if uses_external_data(zp):
                zp = onnx.TensorProto.FromString(zp.SerializeToString())
                load_external_data_for_tensor(zp, str(base_dir))
            if np.any(numpy_helper.to_array(zp).astype(np.float64) != 0):
                problems.append(f"{label}: non-zero zero point; TensorRT quantization is symmetric (zero point 0)")
    return problems


def external_files(model: onnx.ModelProto) -> set[str]:
    """The external-data file names the model's initializers point to (relative to the model)."""
    out = set()
    for t in model.graph.initializer:
        if uses_external_data(t):
            out.update(kv.value for kv in t.external_data if kv.key == "location")
    return out

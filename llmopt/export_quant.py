"""Carry quantized weights into the exported ONNX as standard QDQ (no contrib ops).

The exporter writes each linear's dequantized weight as a float initializer feeding a MatMul
(``B = W^T``, [in, out]; names are lost to constant folding). This pass finds those initializers
by content, and replaces each with

    DequantizeLinear(q^T int8|uint8|int4|uint4, scale^T [, zero_point^T], axis, block_size) → MatMul

int8 is per output channel (axis=1, 1-D scale); int4 is block-wise along the input dimension
(axis=0, block_size=group, opset ≥ 21). W8A8 (SmoothQuant) also gets QuantizeLinear →
DequantizeLinear on the MatMul's activation input with the static calibrated scale. The graph stays
portable: ONNX Runtime fuses DQ→MatMul into MatMulNBits at load, TensorRT reads explicit Q/DQ.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmopt.errors import UserError


@dataclass(frozen=True)
class QWeight:
    """One quantized linear in nn.Linear orientation: q [out, in], scale/zero_point [out, groups]."""

    q: np.ndarray                     # integer values (int8 array), unpacked
    scale: np.ndarray                 # float32 [out, groups]
    zero_point: np.ndarray | None     # integer [out, groups] or None (symmetric)
    bits: int
    group_size: int | None            # None: per output channel
    dequantized: np.ndarray           # float32 [out, in], what the PyTorch reference uses
    input_scale: float | None = None  # W8A8 static activation scale
    input_zero_point: int | None = None
    input_dtype: str = "uint8"


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _int_type(q: np.ndarray, zp: np.ndarray | None, bits: int) -> type:
    unsigned = zp is not None and q.min() >= 0 and zp.min() >= 0
    if bits == 4:
        return ml_dtypes.uint4 if unsigned else ml_dtypes.int4
    return np.uint8 if unsigned else np.int8


def _dq_nodes(name: str, qw: QWeight, float_dtype: np.dtype, opset: int) -> tuple[list, list]:
    """Initializers and the DequantizeLinear node producing B = W^T [in, out] as ``{name}_B``."""
    if qw.bits == 4 and opset < 21:
        raise UserError(f"int4 weights need ONNX opset >= 21 (block-wise DequantizeLinear), got {opset}",
                        "export with --opset 21 or higher")
    itype = _int_type(qw.q, qw.zero_point, qw.bits)
    q_t = qw.q.T.astype(itype)
    if qw.group_size is None:  # per output channel: axis=1 over [in, out]
        scale = qw.scale.reshape(-1).astype(float_dtype)
        zp = None if qw.zero_point is None else qw.zero_point.reshape(-1).astype(itype)
        attrs = {"axis": 1}
    else:  # block-wise along the input dimension
        scale = qw.scale.T.astype(float_dtype)
        zp = None if qw.zero_point is None else qw.zero_point.T.astype(itype)
        attrs = {"axis": 0, "block_size": qw.group_size}
    inits = [numpy_helper.from_array(q_t, f"{name}.qweight"), numpy_helper.from_array(scale, f"{name}.scales")]
    inputs = [f"{name}.qweight", f"{name}.scales"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, f"{name}.zeros"))
        inputs.append(f"{name}.zeros")
    node = helper.make_node("DequantizeLinear", inputs, [f"{name}_B"], name=f"/{name}/weight/DequantizeLinear", **attrs)
    return inits, [node]


def _act_qdq(name: str, x: str, qw: QWeight, float_dtype: np.dtype) -> tuple[list, list, str]:
    zdtype, zp = (np.uint8, qw.input_zero_point or 0) if qw.input_dtype == "uint8" else (np.int8, qw.input_zero_point or 0)
    if qw.input_dtype == "uint8" and zp == 128:  # the same quantizer as int8 with zero point 0, which TensorRT requires
        zdtype, zp = np.int8, 0
    s = numpy_helper.from_array(np.array(qw.input_scale, float_dtype), f"{name}.input_scale")
    z = numpy_helper.from_array(np.array(zp, zdtype), f"{name}.input_zero_point")
    q = helper.make_node("QuantizeLinear", [x, s.name, z.name], [f"{name}_xq"], name=f"/{name}/input/QuantizeLinear")
    dq = helper.make_node("DequantizeLinear", [f"{name}_xq", s.name, z.name], [f"{name}_xdq"],
                          name=f"/{name}/input/DequantizeLinear")
    return [s, z], [q, dq], f"{name}_xdq"


def rewrite_qdq(model: onnx.ModelProto, weights: dict[str, QWeight], float_dtype: str) -> dict:
    """Replace each quantized linear's float weight initializer with a QDQ subgraph, in place."""
    fdt = np.dtype(float_dtype)
    by_digest = {_digest(qw.dequantized.T.astype(fdt)): name for name, qw in weights.items()}
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    matched: dict[str, str] = {}
    new_nodes, drop = [], set()
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            init = inits[node.input[1]]
            arr = numpy_helper.to_array(init)
            if arr.ndim == 2 and arr.dtype == fdt:
                name = by_digest.get(_digest(arr))
                if name is not None and name not in matched:
                    qw = weights[name]
                    w_inits, w_nodes = _dq_nodes(name, qw, fdt, model.opset_import[0].version)
                    g.initializer.extend(w_inits)
                    new_nodes += w_nodes
                    node.input[1] = f"{name}_B"
                    if qw.input_scale is not None:
                        a_inits, a_nodes, x = _act_qdq(name, node.input[0], qw, fdt)
                        g.initializer.extend(a_inits)
                        new_nodes += a_nodes
                        node.input[0] = x
                    matched[name] = init.name
                    drop.add(init.name)
        new_nodes.append(node)
    missing = sorted(set(weights) - set(matched))
    if missing:
        raise RuntimeError(f"quantized linears not found in the exported graph: {missing[:3]}")
    still_used = {i for n in new_nodes for i in n.input}
    keep = [t for t in g.initializer if t.name not in drop or t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.node[:]
    g.node.extend(new_nodes)
    return {"quantized_matmuls": len(matched), "activation_qdq": sum(1 for w in weights.values() if w.input_scale is not None)}

"""Quantized linears as standard QDQ (no contrib ops), built straight from the quantized checkpoint.

Each quantized linear ``<name>`` (quantization.json ``modules``) gets, in place of its float weight,

    DequantizeLinear(<name>.qweight int8|int4 [in, out], <name>.scales [, <name>.zeros], axis, block_size) → MatMul

int8 is per output channel (axis=1, 1-D scale); int4 is block-wise along the input dimension (axis=0,
block_size=group, opset ≥ 21). W8A8 (SmoothQuant) also gets QuantizeLinear → DequantizeLinear on the
MatMul's activation input with the static calibrated scale. The initializers are lazy: each is read
from the checkpoint, unpacked and transposed only when it is written. The graph stays portable: ONNX
Runtime fuses DQ→MatMul into MatMulNBits at load, TensorRT reads explicit Q/DQ.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from llmopt.errors import UserError
from llmopt.models.safetensors_io import SafetensorsReader
from llmopt.quant.packing import unpack_int4


def _lazy(name: str, dtype: ir.DataType, shape: list[int], fn) -> ir.Value:  # noqa: ANN001
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape),
                    const_value=ir.LazyTensor(lambda: ir.tensor(fn(), name=name), dtype=dtype, shape=ir.Shape(shape),
                                              name=name))


def dequantized_weight(graph: ir.Graph, tensors: SafetensorsReader, name: str, info: dict, float_dtype: ir.DataType,
                       opset: int) -> tuple[ir.Value, ir.Node]:
    """The DequantizeLinear node writing ``B = W^T`` [in, out] of linear ``name`` and its output value."""
    bits, group = info["bits"], info["group_size"]
    if bits == 4 and opset < 21:
        raise UserError(f"int4 weights need ONNX opset >= 21 (block-wise DequantizeLinear), got {opset}",
                        "export with --opset 21 or higher")
    n_out, n_in = info["out_features"], info["in_features"]
    itype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
    npint = ml_dtypes.int4 if bits == 4 else np.int8
    fdt = float_dtype.numpy()

    def qweight() -> np.ndarray:
        raw = tensors.get(f"{name}.qweight")
        q = unpack_int4(raw, signed=True) if bits == 4 else raw.to(torch.int8)
        if tuple(q.shape) != (n_out, n_in):
            raise UserError(f"{name}.qweight has shape {tuple(q.shape)}, quantization.json says [{n_out}, {n_in}]")
        return q.T.contiguous().numpy().astype(npint)

    per_channel = group is None
    groups = 1 if per_channel else -(-n_in // group)
    s_shape = [n_out] if per_channel else [groups, n_out]

    def grid(suffix: str, dtype) -> np.ndarray:  # noqa: ANN001 - [out, groups] → the DQ layout
        t = tensors.get(f"{name}.{suffix}")
        return (t.reshape(-1) if per_channel else t.T).contiguous().numpy().astype(dtype)

    inputs = [_lazy(f"{name}.qweight", itype, [n_in, n_out], qweight),
              _lazy(f"{name}.scales", float_dtype, s_shape, lambda: grid("scales", fdt))]
    if f"{name}.zeros" in tensors:
        inputs.append(_lazy(f"{name}.zeros", itype, s_shape, lambda: grid("zeros", npint)))
    for v in inputs:
        graph.register_initializer(v)
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": group}
    node = ir.node("DequantizeLinear", inputs, attrs, name=f"/{name}/weight/DequantizeLinear")
    node.outputs[0].name = f"{name}_B"
    return node.outputs[0], node


def activation_qdq(graph: ir.Graph, tensors: SafetensorsReader, name: str, consumer: ir.Node,
                   float_dtype: ir.DataType) -> list[ir.Node]:
    """W8A8: QuantizeLinear → DequantizeLinear on ``consumer``'s activation input (static scale)."""
    scale = float(tensors.get(f"{name}.input_scale"))
    zp = int(tensors.get(f"{name}.input_zero_point"))
    zdtype = np.uint8
    if zp == 128:  # uint8 with zero point 128 is int8 with zero point 0, which TensorRT requires
        zdtype, zp = np.int8, 0
    s = ir.Value(name=f"{name}.input_scale", const_value=ir.tensor(np.array(scale, float_dtype.numpy())))
    z = ir.Value(name=f"{name}.input_zero_point", const_value=ir.tensor(np.array(zp, zdtype)))
    for v in (s, z):
        v.type, v.shape = ir.TensorType(v.const_value.dtype), ir.Shape([])
        graph.register_initializer(v)
    q = ir.node("QuantizeLinear", [consumer.inputs[0], s, z], name=f"/{name}/input/QuantizeLinear")
    q.outputs[0].name = f"{name}_xq"
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"/{name}/input/DequantizeLinear")
    dq.outputs[0].name = f"{name}_xdq"
    consumer.replace_input_with(0, dq.outputs[0])
    return [q, dq]

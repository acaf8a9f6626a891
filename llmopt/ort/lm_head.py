"""lm_head quantization: the float logits MatMul becomes MatMulNBits (int4/int8, symmetric block-wise RTN)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmopt.ort.graph import MS_DOMAIN, RewriteUnsupported, _Index, _opset, prune

LM_HEAD_BLOCK = 32


def lm_head_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The MatMul that writes ``logits`` from a float weight initializer."""
    ix = _Index(model.graph)
    node = ix.producer.get("logits")
    if node is None or node.op_type != "MatMul":
        raise RewriteUnsupported(f"logits are not written by a MatMul ({node.op_type if node else 'no producer'})")
    weight = ix.inits.get(node.input[1])
    if weight is None or weight.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise RewriteUnsupported("the lm_head weight is not a float initializer (already quantized?)")
    return node


def rtn_blockwise(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of ``w`` [K, N] per block of ``block_size`` along K.

    Returns (q unsigned [N, k_blocks, block_size] with zero point 2**(bits-1), scales [N, k_blocks]). As in
    Q4_0, the scale maps each block's largest-magnitude value to the negative end of the range (-8 for
    int4, -128 for int8), so a block uses the whole signed range.
    """
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, blocks, block_size)
    idx = np.abs(wt).argmax(axis=2)[..., None]
    peak = np.take_along_axis(wt, idx, axis=2)[..., 0]
    half = 2 ** (bits - 1)
    scale = peak / -half
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(wt / scale[..., None]), -half, half - 1) + half
    return q.astype(np.uint8), scale.astype(np.float32)


def pack_nbits(q: np.ndarray, bits: int) -> np.ndarray:
    """[N, k_blocks, block] unsigned values → MatMulNBits' B [N, k_blocks, block*bits/8] (low nibble first)."""
    if bits == 8:
        return q
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def quantize_lm_head(model: onnx.ModelProto, bits: int, accuracy_level: int,
                     block_size: int = LM_HEAD_BLOCK) -> tuple[onnx.ModelProto, dict]:
    """Replace the float lm_head MatMul with MatMulNBits (symmetric block-wise RTN), in place."""
    node = lm_head_node(model)
    g = model.graph
    weight = next(t for t in g.initializer if t.name == node.input[1])
    w = numpy_helper.to_array(weight).astype(np.float32)
    k, n = w.shape
    q, scale = rtn_blockwise(w, bits, block_size)
    deq = ((q.astype(np.float32) - 2 ** (bits - 1)) * scale[..., None]).reshape(n, -1)[:, :k].T
    packed = pack_nbits(q, bits)
    base = "lm_head"
    inits = [numpy_helper.from_array(packed, f"{base}.qweight"), numpy_helper.from_array(scale, f"{base}.scales")]
    fused = helper.make_node("MatMulNBits", [node.input[0], inits[0].name, inits[1].name], list(node.output),
                             name="/lm_head/MatMulNBits", domain=MS_DOMAIN, K=k, N=n, bits=bits,
                             block_size=block_size, accuracy_level=accuracy_level)
    nodes = [fused if x is node else x for x in g.node]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    prune(g)
    _opset(model, MS_DOMAIN, 1)
    err = float(np.abs(deq - w).max() / (np.abs(w).max() or 1.0))
    return model, {"bits": bits, "block_size": block_size, "symmetric": True, "shape": [k, n],
                   "accuracy_level": accuracy_level, "weight_max_rel_error": round(err, 6)}

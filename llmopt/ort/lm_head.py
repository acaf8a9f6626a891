"""The lm_head for ONNX Runtime: MatMulNBits (int4/int8, symmetric block-wise RTN), or for a tied float
lm_head one FusedMatMul reading the embedding it shares with the Gather.

The export writes the lm_head either as ``MatMul(x, W^T)`` with ``W^T`` [hidden, vocab] stored as such, or,
for tied embeddings, as ``MatMul(x, Transpose(E))`` where ``E`` [vocab, hidden] is the one initializer the
embedding ``Gather`` also reads. MatMulNBits wants exactly ``E``'s layout ([N, K], blocks along K).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from llmopt.ort.graph import MS_DOMAIN, RewriteUnsupported, _attr, _Index, _opset, prune
from llmopt.ort.store import IN_MEMORY, TensorStore

LM_HEAD_BLOCK = 32
_ROWS = 4096  # output rows quantized at a time (bounds the temporaries for large vocabularies)


def lm_head_weight(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.TensorProto, bool]:
    """(the MatMul writing ``logits``, its weight initializer, whether that initializer is [N, K] behind a
    Transpose — the tied embedding)."""
    ix = _Index(model.graph)
    node = ix.producer.get("logits")
    if node is None or node.op_type != "MatMul":
        raise RewriteUnsupported(f"logits are not written by a MatMul ({node.op_type if node else 'no producer'})")
    weight, transposed = ix.inits.get(node.input[1]), False
    t = ix.producer.get(node.input[1])
    if weight is None and t is not None and t.op_type == "Transpose" and list(_attr(t, "perm", [])) == [1, 0]:
        weight, transposed = ix.inits.get(t.input[0]), True
    if weight is None or weight.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(weight.dims) != 2:
        raise RewriteUnsupported("the lm_head weight is not a float initializer (already quantized?)")
    return node, weight, transposed


def lm_head_node(model: onnx.ModelProto) -> onnx.NodeProto:
    return lm_head_weight(model)[0]


def rtn_blockwise(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of ``w`` [K, N] per block of ``block_size`` along K.

    Returns (q unsigned [N, k_blocks, block_size] with zero point 2**(bits-1), scales [N, k_blocks]). As in
    Q4_0, the scale maps each block's largest-magnitude value to the negative end of the range (-8 for
    int4, -128 for int8), so a block uses the whole signed range. Works on ``_ROWS`` output rows at a time.
    """
    k, n = w.shape
    blocks = -(-k // block_size)
    q = np.empty((n, blocks, block_size), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    half = 2 ** (bits - 1)
    for r0 in range(0, n, _ROWS):
        r1 = min(n, r0 + _ROWS)
        wt = np.zeros((r1 - r0, blocks * block_size), np.float32)
        wt[:, :k] = w[:, r0:r1].T
        wt = wt.reshape(r1 - r0, blocks, block_size)
        idx = np.abs(wt).argmax(axis=2)[..., None]
        peak = np.take_along_axis(wt, idx, axis=2)[..., 0]
        scale = peak / -half
        scale[scale == 0] = 1.0
        q[r0:r1] = np.clip(np.rint(wt / scale[..., None]), -half, half - 1) + half
        scales[r0:r1] = scale
    return q, scales


def pack_nbits(q: np.ndarray, bits: int) -> np.ndarray:
    """[N, k_blocks, block] unsigned values → MatMulNBits' B [N, k_blocks, block*bits/8] (low nibble first)."""
    if bits == 8:
        return q
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _replace(model: onnx.ModelProto, old: onnx.NodeProto, new: onnx.NodeProto, inits: list) -> None:
    g = model.graph
    nodes = [new if x is old else x for x in g.node]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    prune(g)
    _opset(model, MS_DOMAIN, 1)


def fuse_tied_lm_head(model: onnx.ModelProto) -> dict:
    """``MatMul(x, Transpose(E))`` → ``FusedMatMul(x, E, transB=1)``: the lm_head reads the embedding in place,
    so ONNX Runtime does not fold the Transpose into a second, transposed copy of the weight."""
    try:
        node, weight, transposed = lm_head_weight(model)
    except RewriteUnsupported:
        return {"tied": False}
    if not transposed:
        return {"tied": False}
    fused = helper.make_node("FusedMatMul", [node.input[0], weight.name], list(node.output), name="/lm_head/FusedMatMul",
                             domain=MS_DOMAIN, transB=1)
    _replace(model, node, fused, [])
    return {"tied": True, "op": "FusedMatMul", "weight": weight.name}


def quantize_lm_head(model: onnx.ModelProto, bits: int, accuracy_level: int, block_size: int = LM_HEAD_BLOCK,
                     store: TensorStore = IN_MEMORY) -> tuple[onnx.ModelProto, dict]:
    """Replace the float lm_head MatMul with MatMulNBits (symmetric block-wise RTN), in place. A tied embedding
    stays a float initializer for the Gather; the lm_head gets its own quantized copy."""
    node, weight, transposed = lm_head_weight(model)
    w = store.array(weight)
    w = (w.T if transposed else w).astype(np.float32, copy=False)  # [K, N]
    k, n = w.shape
    q, scale = rtn_blockwise(w, bits, block_size)
    err = 0.0
    half = 2 ** (bits - 1)
    for r0 in range(0, n, _ROWS):  # the reconstruction error, a row chunk at a time
        r1 = min(n, r0 + _ROWS)
        deq = ((q[r0:r1].astype(np.float32) - half) * scale[r0:r1, :, None]).reshape(r1 - r0, -1)[:, :k]
        err = max(err, float(np.abs(deq - w[:, r0:r1].T).max()))
    err /= float(np.abs(w).max()) or 1.0
    base = "lm_head"
    inits = [store.tensor(pack_nbits(q, bits), f"{base}.qweight"), store.tensor(scale, f"{base}.scales")]
    del q, w
    fused = helper.make_node("MatMulNBits", [node.input[0], inits[0].name, inits[1].name], list(node.output),
                             name="/lm_head/MatMulNBits", domain=MS_DOMAIN, K=k, N=n, bits=bits,
                             block_size=block_size, accuracy_level=accuracy_level)
    _replace(model, node, fused, inits)
    return model, {"bits": bits, "block_size": block_size, "symmetric": True, "shape": [k, n], "tied": transposed,
                   "accuracy_level": accuracy_level, "weight_max_rel_error": round(err, 6)}

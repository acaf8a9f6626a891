"""ORT-only graph rewrites on small synthetic graphs: same outputs as before the rewrite."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmopt import ort as F


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _model(nodes, inits, outputs, k=64, opset=21) -> onnx.ModelProto:  # noqa: ANN001
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_blockwise_matches_matmulnbits_kernel(bits):
    rng = np.random.default_rng(0)
    k, n, block = 96, 40, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scale = F.rtn_blockwise(w, bits, block)
    deq = ((q.astype(np.float32) - 2 ** (bits - 1)) * scale[..., None]).reshape(n, -1)[:, :k].T
    step = np.repeat(np.abs(scale), block, axis=1)[:, :k].T  # each weight's own block step
    err = np.abs(deq - w)
    # round to nearest (half a step), except the end opposite the block's peak, clipped at 2**(bits-1)-1 (one step)
    assert (err <= step + 1e-6).all() and np.median(err / step) < 0.5
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain=F.MS_DOMAIN, K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    model = _model([node], [numpy_helper.from_array(F.pack_nbits(q, bits), "b"), numpy_helper.from_array(scale, "s")],
                   ["y"], k=k)
    model.opset_import.append(helper.make_opsetid(F.MS_DOMAIN, 1))
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    (y,) = _run(model, {"x": x})
    np.testing.assert_allclose(y, x @ deq, rtol=1e-4, atol=1e-4)


def test_quantize_lm_head_replaces_the_logits_matmul():
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((64, 100)).astype(np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["logits"], name="/lm_head/MatMul")], [w], ["logits"])
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    (want,) = _run(model, {"x": x})
    model, info = F.quantize_lm_head(model, bits=8, accuracy_level=0)
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    assert info["bits"] == 8 and info["shape"] == [64, 100] and 0 < info["weight_max_rel_error"] < 0.01
    (got,) = _run(model, {"x": x})
    assert np.abs(got - want).max() / np.abs(want).max() < 0.02
    with pytest.raises(F.RewriteUnsupported, match="not written by a MatMul"):
        F.quantize_lm_head(model, bits=4, accuracy_level=0)


def test_pack_float_siblings_into_one_matmul_and_split():
    rng = np.random.default_rng(2)
    ws = [numpy_helper.from_array(rng.standard_normal((64, n)).astype(np.float32), f"w{i}") for i, n in enumerate((32, 16, 48))]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(3)]
    model = _model(nodes, ws, ["y0", "y1", "y2"])
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    want = _run(model, {"x": x})
    assert F.pack_matmuls(model) == {"packed": 1, "packed_qkv": 0}
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Split"]
    for a, b in zip(_run(model, {"x": x}), want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pack_int4_blockwise_dequantize_siblings():
    rng = np.random.default_rng(3)
    nodes, inits = [], []
    for i, n in enumerate((32, 64)):
        inits += [numpy_helper.from_array(rng.integers(-8, 8, (64, n)).astype(ml_dtypes.int4), f"q{i}"),
                  numpy_helper.from_array(rng.random((2, n)).astype(np.float32), f"s{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], axis=0, block_size=32),
                  helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"])]
    model = _model(nodes, inits, ["y0", "y1"])
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    want = _run(model, {"x": x})
    assert F.pack_matmuls(model)["packed"] == 1
    assert sorted(n.op_type for n in model.graph.node) == ["DequantizeLinear", "MatMul", "Split"]
    for a, b in zip(_run(model, {"x": x}), want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unrecognized_graph_is_refused():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [], ["y"])
    io = {"dtype": "float32", "head_dim": 64, "num_layers": 1}
    with pytest.raises(F.RewriteUnsupported, match="no standard"):
        F.fuse_gqa(model, io, 128)

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from llmopt.quant.rtn import QTensor, dequantize_values, output_error, qrange, quantize

SCHEMES = [(8, None, True), (8, None, False), (4, 32, True), (4, 64, False), (4, 128, True), (4, None, True)]


def _weights(out=48, inp=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[3, 17] = 1.5  # an outlier
    w[5] = w[5].abs()  # an all-positive row (asymmetric zero point at the edge)
    w[7] = 0.0  # an all-zero row
    return w


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
def test_error_within_half_a_step(bits, group, sym):
    w = _weights()
    qt = quantize(w, bits, group, sym)
    ng = 1 if group is None else w.shape[1] // group
    assert qt.q.dtype == torch.int8 and qt.q.shape == w.shape
    assert qt.scale.shape == (w.shape[0], ng) and (qt.scale > 0).all()
    lo, hi = qrange(bits)
    assert int(qt.q.min()) >= lo and int(qt.q.max()) <= hi
    if sym:
        assert qt.zero_point is None and int(qt.q.min()) >= -hi  # -2^(b-1) never used
    else:
        assert qt.zero_point.dtype == torch.int8 and qt.zero_point.shape == qt.scale.shape
        assert int(qt.zero_point.min()) >= lo and int(qt.zero_point.max()) <= hi
    err = (w - qt.dequantize()).abs().reshape(w.shape[0], ng, -1)
    bound = qt.scale.unsqueeze(-1) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
def test_zero_is_exact_and_zero_rows_stay_zero(bits, group, sym):
    w = _weights()
    w[:, 0] = 0.0
    dq = quantize(w, bits, group, sym).dequantize()
    assert torch.equal(dq[:, 0], torch.zeros(w.shape[0]))
    assert torch.equal(dq[7], torch.zeros(w.shape[1]))


def test_more_bits_smaller_groups_less_error():
    w = _weights()
    e = lambda *a: float((w - quantize(w, *a).dequantize()).pow(2).mean())  # noqa: E731
    assert e(8, None, True) < e(4, 32, True) < e(4, 128, True) < e(4, None, True)


@pytest.mark.parametrize("sym", [True, False])
def test_partial_last_group_is_quantized_from_its_own_columns(sym):
    """96 inputs in groups of 64: one full group and one of 32, each exactly as if quantized alone."""
    w = torch.randn(8, 96)
    qt = quantize(w, 4, 64, sym)
    assert qt.scale.shape == (8, 2) and qt.group_size == 64 and qt.partial_group == 32
    first, last = quantize(w[:, :64], 4, None, sym), quantize(w[:, 64:], 4, None, sym)
    assert torch.equal(qt.q, torch.cat([first.q, last.q], 1))
    torch.testing.assert_close(qt.scale, torch.cat([first.scale, last.scale], 1))
    deq = torch.cat([first.dequantize(), last.dequantize()], 1)
    torch.testing.assert_close(qt.dequantize(), deq)
    # the format's formula, column by column: W[o, i] = (q[o, i] - z[o, i // g]) * s[o, i // g]
    col = torch.arange(96) // 64
    z = qt.zero_point.float()[:, col] if qt.zero_point is not None else 0.0
    torch.testing.assert_close(qt.dequantize(), (qt.q.float() - z) * qt.scale[:, col])
    assert quantize(w, 4, 128, sym).group_size is None  # a group wider than the row: per channel


def test_scale_rows_is_exact():
    w = _weights()
    for sym in (True, False):
        qt = quantize(w, 4, 32, sym)
        f = torch.linspace(0.5, 2.0, w.shape[0])
        before = qt.dequantize()
        qt.scale_rows(f)
        torch.testing.assert_close(qt.dequantize(), before * f[:, None], rtol=1e-6, atol=0)


def test_clip_saturates():
    w = _weights()
    clip = torch.full((w.shape[0], 8), 0.5)
    qt = quantize(w, 4, 32, True, clip)
    assert qt.dequantize().abs().max() <= w.abs().max() * 0.5 + 1e-6


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 64, True), (8, None, False), (8, None, True)])
def test_dequantize_is_onnx_dequantizelinear(bits, group, sym):
    """The documented formula is ONNX DequantizeLinear on the transposed [in, out] weight."""
    w = _weights()
    qt = quantize(w, bits, group, sym)
    np_int = (ml_dtypes.int4 if bits == 4 else np.int8)
    inits = [numpy_helper.from_array(qt.q.numpy().T.astype(np_int), "q")]
    if group is None:
        attrs = {"axis": 1}
        inits.append(numpy_helper.from_array(qt.scale.numpy().reshape(-1), "s"))
        zp = None if qt.zero_point is None else qt.zero_point.numpy().reshape(-1).astype(np_int)
    else:
        attrs = {"axis": 0, "block_size": group}
        inits.append(numpy_helper.from_array(qt.scale.numpy().T.copy(), "s"))
        zp = None if qt.zero_point is None else qt.zero_point.numpy().T.astype(np_int)
    inputs = ["q", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "z"))
        inputs.append("z")
    node = helper.make_node("DequantizeLinear", inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (y,) = ReferenceEvaluator(model).run(None, {})
    np.testing.assert_allclose(y.T, qt.dequantize().numpy(), rtol=1e-6, atol=1e-7)


def test_output_error_matches_direct_computation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 64, generator=g)
    w = torch.randn(16, 64, generator=g)
    wq = quantize(w, 4, 32).dequantize()
    direct = float((x @ (w - wq).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())
    assert output_error(w, wq, x.t() @ x) == pytest.approx(direct, rel=1e-5)


def test_qtensor_dequantize_values_consistent():
    w = _weights()
    qt = quantize(w, 4, 64, False)
    assert isinstance(qt, QTensor) and qt.shape == tuple(w.shape)
    torch.testing.assert_close(dequantize_values(qt.q, qt.scale, qt.zero_point), qt.dequantize())

import pytest
import torch

from llmopt.quant.gptq import gptq_quantize, inverse_hessian_factor
from llmopt.quant.rtn import output_error, qrange, quantize


def _data(inp=256, out=96, tokens=2048, seed=0):
    """Correlated inputs (decaying spectrum, a few outlier channels) and heavy-ish tailed weights."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(inp, inp, generator=g))[0]
    spectrum = torch.logspace(0, -2, inp)
    mix = basis * spectrum.sqrt()
    x = torch.randn(tokens, inp, generator=g) @ mix.t() + 0.05 * torch.randn(tokens, inp, generator=g)
    x[:, :3] *= 8.0
    w = 0.05 * torch.randn(out, inp, generator=g) * (0.5 + torch.rand(out, inp, generator=g))
    return w, x


@pytest.mark.parametrize("bits,group,sym,act_order", [
    (4, 128, True, False), (4, 96, True, False), (4, 96, False, True), (4, 32, True, False), (4, 64, False, False), (4, 128, True, True),
    (4, 32, False, True), (4, None, True, False), (8, None, True, False),
])
def test_gptq_beats_rtn_on_calibration_and_heldout(bits, group, sym, act_order):
    w, x = _data()
    h = x.t() @ x
    qt = gptq_quantize(w, h, bits, group, sym, damp=0.01, block_size=64, act_order=act_order)
    rtn = quantize(w, bits, group, sym).dequantize()
    e_gptq, e_rtn = output_error(w, qt.dequantize(), h), output_error(w, rtn, h)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    _, x2 = _data(seed=0, tokens=4096)  # same distribution; rows 2048: are tokens GPTQ never saw
    x2 = x2[2048:]
    h2 = x2.t() @ x2
    assert output_error(w, qt.dequantize(), h2) < output_error(w, rtn, h2)


def test_qtensor_layout():
    w, x = _data()
    qt = gptq_quantize(w, x.t() @ x, 4, 32, symmetric=False, act_order=True)
    assert qt.q.shape == w.shape and qt.q.dtype == torch.int8
    assert qt.scale.shape == (w.shape[0], w.shape[1] // 32) and qt.zero_point.shape == qt.scale.shape
    lo, hi = qrange(4)
    assert lo <= int(qt.q.min()) and int(qt.q.max()) <= hi and qt.group_size == 32


def test_uncorrelated_inputs_reduce_to_rtn():
    """With H ∝ I no error is propagated, so GPTQ must give exactly the RTN integers and scales."""
    w, _ = _data()
    for group, sym, ao in [(32, True, False), (64, False, True), (None, True, False), (96, True, True)]:
        qt = gptq_quantize(w, torch.eye(w.shape[1]) * 3.0, 4, group, sym, act_order=ao, block_size=48)
        ref = quantize(w, 4, group, sym)
        assert torch.equal(qt.q, ref.q)
        torch.testing.assert_close(qt.scale, ref.scale)


@pytest.mark.parametrize("group,act_order", [(32, False), (32, True), (None, False)])
def test_lazy_block_updates_do_not_change_the_result(group, act_order):
    """Lazy batching is an exact reordering of the updates (groups entered mid-block included)."""
    w, x = _data(inp=128, out=32)
    h = x.t() @ x
    ref = gptq_quantize(w, h, 4, group, True, block_size=1, act_order=act_order)
    for bs in (7, 48, 128, 1000):
        qt = gptq_quantize(w, h, 4, group, True, block_size=bs, act_order=act_order)
        assert (qt.q == ref.q).float().mean() > 0.995
        torch.testing.assert_close(qt.scale, ref.scale, rtol=1e-4, atol=1e-6)
        assert output_error(w, qt.dequantize(), h) == pytest.approx(output_error(w, ref.dequantize(), h), rel=2e-2)


def test_dead_inputs():
    w, x = _data(inp=128, out=32)
    x[:, 10:20] = 0.0
    h = x.t() @ x
    qt = gptq_quantize(w, h, 4, 32, True)
    dq = qt.dequantize()
    assert torch.isfinite(dq).all()
    assert torch.equal(dq[:, 10:20], torch.zeros(32, 10))
    assert output_error(w, dq, h) < output_error(w, quantize(w, 4, 32).dequantize(), h)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-6, 1e-9), (torch.float32, 1e-3, 1e-6)])
def test_inverse_factor_is_upper_cholesky_of_inverse(dtype, rtol, atol):
    _, x = _data(inp=64, out=8)
    h = (x.t() @ x).to(dtype)
    before = h.clone()
    u = inverse_hessian_factor(h, 0.01)  # factorized in place in a working copy
    assert u.dtype == dtype and torch.equal(h, before)
    assert torch.equal(u, torch.triu(u))
    hd = h.double() + 0.01 * torch.diagonal(h).mean().double() * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close((u.t() @ u).double(), torch.linalg.inv(hd), rtol=rtol, atol=atol)


def test_inverse_factor_dead_inputs_and_float64_retry(monkeypatch):
    from llmopt.quant import gptq

    _, x = _data(inp=64, out=8)
    x[:, 5] = 0.0
    h = x.t() @ x
    hd = h.double().clone()
    hd[5, 5] = 1.0
    hd += 0.01 * torch.diagonal(hd).mean() * torch.eye(64, dtype=torch.float64)
    u = inverse_hessian_factor(h, 0.01, torch.diagonal(h) == 0)
    torch.testing.assert_close((u.t() @ u).double(), torch.linalg.inv(hd), rtol=1e-3, atol=1e-6)
    # a float32 factorization that fails is retried in float64 at the same dampening, before it grows
    calls, real = [], gptq._factor_in_place
    monkeypatch.setattr(gptq, "_factor_in_place",
                        lambda a, lam: calls.append((a.dtype, lam)) or (a.dtype == torch.float64 and real(a, lam)))
    u = inverse_hessian_factor(h, 0.01, torch.diagonal(h) == 0)
    assert [c[0] for c in calls] == [torch.float32, torch.float64] and calls[0][1] == calls[1][1]
    assert u.dtype == torch.float32
    torch.testing.assert_close((u.t() @ u).double(), torch.linalg.inv(hd), rtol=1e-5, atol=1e-8)


def test_singular_hessian_is_dampened():
    w, x = _data(inp=64, out=8, tokens=16)  # rank 16 < 64
    qt = gptq_quantize(w, x.t() @ x, 4, 32, True, damp=1e-6)
    assert torch.isfinite(qt.dequantize()).all()


@pytest.mark.parametrize("inp,group,sym,act_order", [(256, 32, True, False), (256, 64, False, True), (288, 64, True, False)])
def test_rows_stacked_give_each_linear_its_own_result(inp, group, sym, act_order):
    """q/k/v share H: GPTQ on their stacked rows equals GPTQ on each (what GPTQ.quantize_group relies on)."""
    from types import SimpleNamespace

    from llmopt.quant.gptq import GPTQ
    from llmopt.recipe import QuantizeConfig

    w, x = _data(inp=inp)
    h = x.t() @ x
    parts = {"q": w[:40], "k": w[40:64], "v": w[64:]}
    method = GPTQ(QuantizeConfig(method="gptq", bits=4, group_size=group, symmetric=sym, act_order=act_order, block_size=64))
    joint = method.quantize_group(SimpleNamespace(stats=SimpleNamespace(h=h)), parts)
    for name, part in parts.items():
        alone = gptq_quantize(part, h, 4, group, sym, damp=0.01, block_size=64, act_order=act_order)
        assert torch.equal(joint[name].q, alone.q)
        torch.testing.assert_close(joint[name].scale, alone.scale, rtol=1e-6, atol=0)

import pytest
import torch

from llmopt.quant.awq import search_clip, search_scale
from llmopt.quant.rtn import fake_quantize, output_error, quantize


def _data(inp=256, outs=(96, 64), tokens=2048, seed=0):
    """Activations whose channel magnitudes span two decades (a few salient channels), as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.randn(inp, generator=g) * 0.8)
    mag[torch.randperm(inp, generator=g)[:4]] *= 20
    x = torch.randn(tokens, inp, generator=g) * mag
    ws = [0.05 * torch.randn(o, inp, generator=g) for o in outs]
    return ws, x


@pytest.mark.parametrize("group,sym", [(128, True), (64, False), (32, True)])
def test_scaled_error_below_unscaled(group, sym):
    ws, x = _data()
    h = x.t() @ x
    s, info = search_scale(ws, h, x.abs().mean(0), 4, group, sym, grid=20)
    assert info["ratio"] > 0 and info["loss"] < 0.9 * info["loss_unscaled"]
    for w in ws:
        eff = fake_quantize(w * s, 4, group, sym) / s
        assert output_error(w, eff, h) < output_error(w, quantize(w, 4, group, sym).dequantize(), h)


def test_ratio_zero_is_plain_rtn():
    ws, x = _data()
    h = x.t() @ x
    _, info = search_scale(ws, h, x.abs().mean(0), 4, 128, True, grid=20)
    direct = sum(float(((w - quantize(w, 4, 128).dequantize()) @ h * (w - quantize(w, 4, 128).dequantize())).sum())
                 for w in ws)
    assert info["loss_unscaled"] == pytest.approx(direct, rel=1e-4)


def test_scales_generalize_to_heldout_tokens():
    ws, x = _data(tokens=4096)
    cal, held = x[:2048], x[2048:]
    s, _ = search_scale(ws, cal.t() @ cal, cal.abs().mean(0), 4, 128, True)
    hh = held.t() @ held
    for w in ws:
        assert output_error(w, fake_quantize(w * s, 4, 128) / s, hh) < output_error(w, fake_quantize(w, 4, 128), hh)


def test_clip_search_block_diagonal_then_full_hessian():
    ws, x = _data()
    h = x.t() @ x
    w = ws[0]
    g = 32
    block = search_clip(w, h, 4, g, True, grid=20, passes=0)  # AWQ's per-group objective
    assert block.shape == (w.shape[0], w.shape[1] // g)
    assert (block <= 1).all() and (block >= 0.5).all() and (block < 1).any()
    for k in range(w.shape[1] // g):  # per group never worse than no clipping
        hb = h[k * g:(k + 1) * g, k * g:(k + 1) * g]
        d0 = (w - fake_quantize(w, 4, g))[:, k * g:(k + 1) * g]
        d1 = (w - fake_quantize(w, 4, g, clip=block))[:, k * g:(k + 1) * g]
        assert ((d1 @ hb) * d1).sum(1).le(((d0 @ hb) * d0).sum(1) * (1 + 1e-5) + 1e-9).all()

    def row_err(clip):
        d = w - fake_quantize(w, 4, g, clip=clip)
        return ((d @ h) * d).sum(1)

    full = search_clip(w, h, 4, g, True, grid=20, passes=2)  # coordinate descent with the cross terms
    assert row_err(full).le(row_err(block) * (1 + 1e-5)).all()
    assert row_err(full).sum() < row_err(block).sum()
    assert row_err(full).sum() < row_err(None).sum()

"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models"): W8A8 with activation outliers migrated into the weights.

For the linears that share one input X (e.g. q/k/v after the input norm), per input channel j

    s_j = max|X_j|^α / max|W_:,j|^(1-α)        (α = 0.5 by default)

and ``X diag(s)⁻¹ · (W diag(s))ᵀ == X Wᵀ``: ``1/s`` is folded into the op producing X (the norm's weight
and bias, or the rows of a previous linear — done by :mod:`llmopt.quant.calibrate`), ``s`` into the
linears' input columns. Weights are then int8 per output channel and each linear's input gets a STATIC
per-tensor scale from the calibration absmax of the smoothed activation.

Activation quantization is recorded as UNSIGNED uint8 with zero point 128 (ONNX Runtime's
``QuantizeLinear`` path that works on opset-23 exports): ``q = clamp(round(x / scale) + 128, 0, 255)``,
``x̂ = (q - 128) · scale``, ``scale = absmax / 127``. It is numerically identical to signed int8 with zero
point 0 and the same scale (the form TensorRT needs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmopt.quant.method import GroupContext, Method
from llmopt.quant.rtn import QTensor, output_error, quantize

ACT_DTYPE = "uint8"
ACT_ZERO_POINT = 128
ACT_QMAX = 127  # x / scale lies in [-128, 127] after removing the zero point


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5,
                  eps: float = 1e-5) -> torch.Tensor:
    """Per-input-channel smoothing factors ``s`` for linears (``[out, in]`` weights) sharing one input."""
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a = act_absmax.float().clamp(min=eps)
    s = a.pow(alpha) / w_absmax.clamp(min=eps).pow(1 - alpha)
    # channels never active on the calibration data, or with all-zero weights: leave them alone
    s = torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(min=eps)


def activation_qparams(absmax: float) -> tuple[float, int]:
    """Static per-tensor (scale, zero_point) of a uint8 activation with calibration ``absmax``."""
    scale = float(absmax) / ACT_QMAX
    return (scale if scale > 0 else 1.0), ACT_ZERO_POINT


def fake_quant_activation(x: torch.Tensor, scale: float, zero_point: int = ACT_ZERO_POINT) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` for uint8 (round half to even, like ONNX)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return ((q - zero_point) * scale).to(x.dtype)


def w8a8_output_error(x: torch.Tensor, w_ref: torch.Tensor, w_q: torch.Tensor, act_scale: float,
                      smooth: torch.Tensor | None = None) -> float:
    """Relative output MSE of ``fq(x / s) @ w_qᵀ`` against the float ``x @ w_refᵀ`` (x: sampled rows)."""
    x = x.float()
    ref = x @ w_ref.float().t()
    xs = x / smooth if smooth is not None else x
    out = fake_quant_activation(xs, act_scale) @ w_q.float().t()
    den = float(ref.pow(2).sum())
    num = float((ref - out).pow(2).sum())
    return num / den if den > 0 else num


def act_hook(module: nn.Module, qp: dict) -> Any:
    """A forward pre-hook that fake-quantizes ``module``'s input with its static parameters."""
    scale, zp = qp["scale"], qp["zero_point"]

    def pre(_m: nn.Module, args: tuple) -> tuple:
        return (fake_quant_activation(args[0], scale, zp),) + tuple(args[1:])

    return module.register_forward_pre_hook(pre)


class SmoothQuant(Method):
    """W8A8: smoothing scales folded per smooth group, int8 per-channel weights, a static per-tensor scale
    per linear input; later groups and layers see the fake-quantized activations."""

    name = "smoothquant"
    calibrated = True
    activations = True
    SAMPLE_TOKENS = 4096  # token rows kept per group to measure the W8A8 output error

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.symmetric = True
        self.group_size = None

    def sample_every(self, total_tokens: int) -> int:
        return max(1, total_tokens // self.SAMPLE_TOKENS)

    def smooth(self, ctx: GroupContext) -> tuple[torch.Tensor, dict] | None:
        if ctx.smooth is None:
            return None
        s = smooth_scales(ctx.stats.absmax, [ctx.w_orig[t] for t in ctx.targets], self.config.alpha)
        return s, {"alpha": self.config.alpha}

    def quantize_linear(self, ctx: GroupContext | None, lin: str, w: torch.Tensor) -> QTensor:
        qt = quantize(w, self.bits, None, True)
        absmax = ctx.stats.absmax if ctx.col_scale is None else ctx.stats.absmax / ctx.col_scale
        scale, zp = activation_qparams(float(absmax.max()))
        ctx.result.act_qparams[ctx.prefix + lin] = {"scale": scale, "zero_point": zp, "dtype": ACT_DTYPE}
        return qt

    def error(self, ctx: GroupContext, lin: str, qt: QTensor) -> dict:
        st, w0 = ctx.stats, ctx.w_orig[lin]
        x = st.sample()
        scale = ctx.result.act_qparams[ctx.prefix + lin]["scale"]
        naive_scale, _ = activation_qparams(float(st.absmax.max()))
        rtn_w = quantize(w0, self.bits, None, True).dequantize()
        return {"method": w8a8_output_error(x, w0, qt.dequantize(), scale, ctx.col_scale),
                "rtn": w8a8_output_error(x, w0, rtn_w, naive_scale),
                "weight_only_rtn": output_error(w0, rtn_w, st.h), "act_scale": scale}

    def after_group(self, ctx: GroupContext) -> list[Any]:
        return [act_hook(ctx.layer.get_submodule(t), ctx.result.act_qparams[ctx.prefix + t]) for t in ctx.targets]

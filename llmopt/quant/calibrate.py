"""The layer-by-layer calibration driver shared by RTN, GPTQ, AWQ and SmoothQuant.

1. The calibration text is tokenized with the checkpoint's tokenizer into ``samples`` windows of
   ``seq_len`` tokens at evenly spaced offsets (deterministic; windows overlap when the text is short).
2. The inputs of decoder layer 0 (hidden states plus every positional/keyword argument the model passes:
   masks, position ids, rotary embeddings) are captured by temporarily replacing layer 0 with a
   "catcher" that raises once it has recorded them.
3. For each decoder layer in order, the layer's linears are processed in "sub-layer" groups in execution
   order (linears sharing one input form a group: q/k/v, o, gate/up, down for Llama). For each group:
   its input statistics (``H = Σ x xᵀ``, mean and max |x| per channel) are collected with a forward
   pre-hook while running the layer on the calibration batches — stopping the forward right there — so
   each group sees the already-quantized outputs of the groups and layers before it (GPTQ's
   "true sequential" order); AWQ / SmoothQuant fold their scales for the group's smooth group; the
   group's linears are quantized and their weights replaced by the dequantized ones; the relative output
   error ``||(W - Ŵ) X||² / ||W X||²`` is recorded for the method and for RTN on the same inputs.
4. The layer is run once more with its quantized weights; its outputs are the next layer's inputs.

Calibration batches interleave the samples (batch b holds samples b, b + nb, …), so every batch spans
the whole text; AWQ's block-output scale search runs on the first batch (≤ ``batch_tokens`` tokens),
everything else on all tokens.

Peak memory is the model plus one layer's inputs and outputs for the calibration set (and one group's
statistics). Linears outside the decoder layers (``lm_head``, ignored by default) are quantized
weight-only when not ignored — GPTQ for ``gptq`` (Hessian of the final norm's outputs), RTN otherwise;
embeddings are always kept in float.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmopt.errors import UserError
from llmopt.models.registry import ArchSpec, SmoothGroup, spec_for
from llmopt.progress import SILENT, Progress
from llmopt.quant import awq as _awq
from llmopt.quant import smoothquant as _sq
from llmopt.quant.capture import Stats, capture_layer0_inputs, collect, layer_out
from llmopt.quant.gptq import gptq_quantize
from llmopt.quant.modules import (check_targets, fold_scales, get_weight, is_ignored, is_linear, set_weight,
                                  sublayer_groups, untie)
from llmopt.quant.rtn import QTensor, fake_quantize, output_error, quantize

SQ_SAMPLE_TOKENS = 4096  # token rows kept per SmoothQuant group to measure the W8A8 output error
AWQ_BLOCK_LOSS = True  # AWQ scale search on the block output (self_attn / mlp), as the reference does


# ----------------------------------------------------------------------------------------------------
# results


@dataclass
class QuantResult:
    """What :func:`quantize_model` produced; the model itself now holds the dequantized weights."""

    qtensors: dict[str, QTensor] = field(default_factory=dict)       # module name -> QTensor [out, in]
    act_qparams: dict[str, dict] = field(default_factory=dict)       # W8A8 linear -> {scale, zero_point, dtype}
    errors: dict[str, dict] = field(default_factory=dict)            # linear -> {method, rtn} rel. output MSE
    ignored: list[str] = field(default_factory=list)                 # linear modules kept in float
    smoothing: dict[str, dict] = field(default_factory=dict)         # AWQ/SQ: group -> search info
    layer_seconds: list[float] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    untied_lm_head: bool = False

    def error_summary(self) -> dict:
        pairs = [(e["method"], e["rtn"]) for e in self.errors.values() if e.get("rtn")]
        if not pairs:
            return {}
        import math

        ratios = [m / r for m, r in pairs if r > 0]
        return {
            "linears": len(pairs),
            "mean_rel_mse": sum(m for m, _ in pairs) / len(pairs),
            "mean_rel_mse_rtn": sum(r for _, r in pairs) / len(pairs),
            "geomean_ratio_vs_rtn": math.exp(sum(math.log(max(x, 1e-30)) for x in ratios) / len(ratios)) if ratios else None,
            "worse_than_rtn": sum(1 for m, r in pairs if m > r * (1 + 1e-6)),
        }


# ----------------------------------------------------------------------------------------------------
# the driver


def _effective(qt: QTensor, col_scale: torch.Tensor | None) -> torch.Tensor:
    w = qt.dequantize()
    return w / col_scale.unsqueeze(0) if col_scale is not None else w


@torch.no_grad()
def quantize_model(model: nn.Module, config: Any, calib_ids: torch.Tensor | None,
                   progress: Progress = SILENT, batch_tokens: int = 4096) -> QuantResult:
    """Quantize ``model`` in place following ``config`` (a ``QuantizeConfig``); see the module doc.

    ``calib_ids`` (``[samples, seq_len]``) may be None only for RTN (then no errors are recorded).
    """
    spec = spec_for(getattr(model.config, "model_type", None))
    model.eval()  # no dropout while calibrating
    method, bits = config.method, config.bits
    group_size = None if bits == 8 else config.group_size
    symmetric = True if method == "smoothquant" else config.symmetric
    patterns = list(config.ignore)
    layers: nn.ModuleList = model.get_submodule(spec.layers_path)
    res = QuantResult()
    check_targets(model, spec, patterns, group_size)
    if calib_ids is None and method != "rtn":
        raise UserError(f"{method} needs calibration data")

    if calib_ids is not None:
        seq_len = calib_ids.shape[1]
        batch = max(1, batch_tokens // seq_len)
        t0 = time.perf_counter()
        nb = -(-calib_ids.shape[0] // batch)
        interleave = [i for start in range(nb) for i in range(start, calib_ids.shape[0], nb)]
        cached = capture_layer0_inputs(model, layers, calib_ids[interleave], batch)  # each batch spans the text
        res.calibration = {"samples": int(calib_ids.shape[0]), "seq_len": int(seq_len),
                           "tokens": int(calib_ids.numel()), "batch": batch,
                           "capture_s": round(time.perf_counter() - t0, 3)}
    else:
        cached = None

    groups = sublayer_groups(spec)
    smooth_by_first = {g.linears[0]: g for g in spec.smooth_groups}
    with progress.task(f"{method} int{bits}: decoder layers", total=len(layers)) as advance:
        for li, layer in enumerate(layers):
            t0 = time.perf_counter()
            prefix = f"{spec.layers_path}.{li}."
            hooks: list[Any] = []
            try:
                for grp in groups:
                    names = [prefix + lin for lin in grp]
                    targets = [lin for lin, n in zip(grp, names) if not is_ignored(n, patterns)]
                    res.ignored += [n for n in names if is_ignored(n, patterns)]
                    if not targets:
                        continue
                    stats = None
                    if cached is not None:
                        every = 0
                        if method == "smoothquant":
                            every = max(1, res.calibration["tokens"] // SQ_SAMPLE_TOKENS)
                        block = _block_of(smooth_by_first.get(grp[0])) if method == "awq" and AWQ_BLOCK_LOSS else None
                        stats = collect(layer, layer.get_submodule(grp[0]), cached, every,
                                        layer.get_submodule(block) if block else None)
                        stats.block = layer.get_submodule(block) if block else None
                    _quantize_group(layer, grp, targets, prefix, smooth_by_first.get(grp[0]), stats,
                                    config, method, bits, group_size, symmetric, res)
                    if method == "smoothquant":
                        for lin in targets:
                            hooks.append(_act_hook(layer.get_submodule(lin), res.act_qparams[prefix + lin]))
                if cached is not None:
                    cached = [(layer_out(layer(h, *rest, **kw)), rest, kw) for h, rest, kw in cached]
            finally:
                for hk in hooks:
                    hk.remove()
            res.layer_seconds.append(round(time.perf_counter() - t0, 3))
            advance(1)

    _quantize_outside_layers(model, spec, patterns, config, bits, group_size, symmetric, res, cached)
    return res


def _block_of(smooth: SmoothGroup | None) -> str | None:
    """The module whose output AWQ's scale search compares: the linears' common parent (self_attn, mlp)
    when the scaled op is outside it; None (per-linear outputs) when it is inside (up_proj → down_proj)."""
    if smooth is None:
        return None
    parents = {lin.rsplit(".", 1)[0] if "." in lin else "" for lin in smooth.linears}
    if len(parents) != 1:
        return None
    parent = parents.pop()
    if not parent or smooth.prev.startswith(parent + "."):
        return None
    return parent


def _block_loss(stats: Stats, mods: dict[str, nn.Module], w_orig: dict[str, torch.Tensor], bits: int,
                group_size: int | None, symmetric: bool) -> Any:
    """loss(s): squared error of the block's output with the linears replaced by Q(W·s)/s."""
    block, inputs = stats.block, stats.block_inputs
    refs = [layer_out(block(*a, **k)).float() for a, k in inputs]

    def loss(s: torch.Tensor) -> float:
        try:
            for t, m in mods.items():
                set_weight(m, fake_quantize(w_orig[t] * s, bits, group_size, symmetric) / s)
            return sum(float((layer_out(block(*a, **k)).float() - r).pow(2).sum())
                       for (a, k), r in zip(inputs, refs))
        finally:
            for t, m in mods.items():
                set_weight(m, w_orig[t])

    return loss


def _act_hook(module: nn.Module, qp: dict) -> Any:
    scale, zp = qp["scale"], qp["zero_point"]

    def pre(_m: nn.Module, args: tuple) -> tuple:
        return (_sq.fake_quant_activation(args[0], scale, zp),) + tuple(args[1:])

    return module.register_forward_pre_hook(pre)


def _quantize_group(layer: nn.Module, grp: tuple[str, ...], targets: list[str], prefix: str,
                    smooth: SmoothGroup | None, stats: Stats | None, config: Any, method: str, bits: int,
                    group_size: int | None, symmetric: bool, res: QuantResult) -> None:
    mods = {lin: layer.get_submodule(lin) for lin in grp}
    w_orig = {lin: get_weight(mods[lin]) for lin in targets}
    col_scale: torch.Tensor | None = None
    gname = prefix + (smooth.prev if smooth else grp[0])

    if smooth is not None and stats is not None and method in ("awq", "smoothquant"):
        if method == "awq" and stats.block is not None and stats.block_inputs:
            col_scale, info = _awq.search_scale_with(
                stats.mean_abs, _block_loss(stats, {t: mods[t] for t in targets}, w_orig, bits, group_size, symmetric),
                grid=config.awq_grid)
        elif method == "awq":
            col_scale, info = _awq.search_scale([w_orig[t] for t in targets], stats.h, stats.mean_abs, bits,
                                                group_size, symmetric, grid=config.awq_grid)
        else:
            col_scale = _sq.smooth_scales(stats.absmax, [w_orig[t] for t in targets], config.alpha)
            info = {"alpha": config.alpha}
        info.update(prev=prefix + smooth.prev, linears=[prefix + t for t in smooth.linears],
                    scale_min=float(col_scale.min()), scale_max=float(col_scale.max()))
        res.smoothing[gname] = info
        fold_scales(layer, smooth, col_scale, res.qtensors, prefix)

    for lin in targets:
        name = prefix + lin
        w = get_weight(mods[lin])  # after folding
        if method == "gptq":
            qt = gptq_quantize(w, stats.h, bits, group_size, symmetric, damp=config.damp,
                               block_size=config.block_size, act_order=config.act_order)
        elif method == "awq" and stats is not None:
            clip = None
            if not any(k in lin for k in ("q_proj", "k_proj", "qkv", "c_attn")):  # AWQ skips q/k clipping
                h_s = stats.h if col_scale is None else stats.h / col_scale.unsqueeze(0) / col_scale.unsqueeze(1)
                clip = _awq.search_clip(w, h_s, bits, group_size, symmetric, grid=config.awq_grid)
            qt = quantize(w, bits, group_size, symmetric, clip)
        else:
            qt = quantize(w, bits, group_size, symmetric)
        res.qtensors[name] = qt
        set_weight(mods[lin], qt.dequantize())

        if method == "smoothquant" and stats is not None:
            smoothed_absmax = stats.absmax / col_scale if col_scale is not None else stats.absmax
            scale, zp = _sq.activation_qparams(float(smoothed_absmax.max()))
            res.act_qparams[name] = {"scale": scale, "zero_point": zp, "dtype": _sq.ACT_DTYPE}
            x = stats.sample()
            naive_scale, _ = _sq.activation_qparams(float(stats.absmax.max()))
            rtn_w = quantize(w_orig[lin], bits, None, True).dequantize()
            res.errors[name] = {
                "method": _sq.w8a8_output_error(x, w_orig[lin], qt.dequantize(), scale, col_scale),
                "rtn": _sq.w8a8_output_error(x, w_orig[lin], rtn_w, naive_scale),
                "weight_only_rtn": output_error(w_orig[lin], rtn_w, stats.h),
                "act_scale": scale,
            }
        elif stats is not None:
            rtn_w = quantize(w_orig[lin], bits, group_size, symmetric).dequantize()
            res.errors[name] = {"method": output_error(w_orig[lin], _effective(qt, col_scale), stats.h),
                                "rtn": output_error(w_orig[lin], rtn_w, stats.h)}


FINAL_NORMS = ("model.norm", "transformer.ln_f")  # where the decoder's final norm lives, by family


def _final_norm(model: nn.Module) -> nn.Module | None:
    for name in FINAL_NORMS:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    return None


def _quantize_outside_layers(model: nn.Module, spec: ArchSpec, patterns: list[str], config: Any, bits: int,
                             group_size: int | None, symmetric: bool, res: QuantResult,
                             final_hidden: list | None) -> None:
    """Weight-only quantization of linears outside the decoder layers (lm_head) unless ignored.

    With calibration data the output head's inputs (final norm of the last layer's quantized outputs)
    give its Hessian: GPTQ is used for ``gptq``, RTN otherwise, and both errors are recorded.
    """
    inside = spec.layers_path + "."
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    norm = _final_norm(model)
    for name, m in list(model.named_modules()):
        if not name or name.startswith(inside) or not is_linear(m):
            continue
        if is_ignored(name, patterns):
            res.ignored.append(name)
            continue
        w = get_weight(m)
        if group_size is not None and group_size < w.shape[1] and w.shape[1] % group_size:
            raise UserError(f"group size {group_size} does not divide {name}'s {w.shape[1]} input features",
                            f"add --ignore {name}")
        if emb is not None and m.weight is getattr(emb, "weight", None):
            untie(m)
            res.untied_lm_head = True
        h = None
        if final_hidden is not None and m is head and norm is not None:
            h = torch.zeros(w.shape[1], w.shape[1])
            for hidden, _, _ in final_hidden:
                x = norm(hidden).reshape(-1, w.shape[1]).float()
                h.addmm_(x.t(), x)
        if h is not None and config.method == "gptq":
            qt = gptq_quantize(w, h, bits, group_size, symmetric, damp=config.damp,
                               block_size=config.block_size, act_order=config.act_order)
        else:
            qt = quantize(w, bits, group_size, symmetric)
        if h is not None:
            res.errors[name] = {"method": output_error(w, qt.dequantize(), h),
                                "rtn": output_error(w, quantize(w, bits, group_size, symmetric).dequantize(), h)}
        res.qtensors[name] = qt
        set_weight(m, qt.dequantize())

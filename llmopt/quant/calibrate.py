"""The layer-walking driver of the calibrated methods (GPTQ, AWQ, SmoothQuant; RTN with error statistics).
It knows no method by name: it calls the hooks of a :class:`llmopt.quant.method.Method`.

1. The calibration text is tokenized with the checkpoint's tokenizer into ``samples`` windows of
   ``seq_len`` tokens at evenly spaced offsets (deterministic; windows overlap when the text is short).
2. The inputs of decoder layer 0 (hidden states plus every positional/keyword argument the model passes:
   masks, position ids, rotary embeddings) are captured by temporarily replacing layer 0 with a
   "catcher" that raises once it has recorded them — only the embeddings run.
3. For each decoder layer in order (a :class:`LayerStore` brings its weights in from disk and takes them
   out again, so only one layer is in memory), the layer's linears are processed in "sub-layer" groups in
   execution order (linears sharing one input form a group: q/k/v, o, gate/up, down for Llama). For each
   group: its input statistics (``H = Σ x xᵀ``, mean and max |x| per channel) are collected with a forward
   pre-hook while running the layer on the calibration batches — stopping the forward right there — so
   each group sees the already-quantized outputs of the groups and layers before it (GPTQ's
   "true sequential" order); the method's ``smooth`` hook may return scales, which are folded into the
   group's smooth group; ``quantize_group`` quantizes the group's linears (by default each through
   ``quantize_linear``) and their weights are replaced by the dequantized ones; ``error`` records the
   relative output error of the method and of RTN.
4. The layer is run once more with its quantized weights; its outputs are the next layer's inputs.

Every forward runs on one calibration batch of at most ``batch_tokens`` tokens (whole samples, at least
one), its statistics accumulated, so the forward's intermediates (the MLP's ``tokens × ffn`` tensors, the
attention scores) are those of one batch, not of every token. The samples are ordered so that the first
``BLOCK_TOKENS`` tokens' worth of them interleave over the whole text (sample s, s + k, s + 2k, …);
block-output objectives (AWQ) use those first batches, the same samples whatever ``batch_tokens`` is.

Peak memory: the layers' neighbours (final norm and lm_head when it is quantized; the embeddings only
until layer 0's inputs are captured, if the store lets them go), one layer in float32, the calibration
hidden states of one layer boundary plus one batch of the next (reported as ``activation_bytes``: each
batch's output replaces its input as the layer runs), one batch's forward and one group's statistics.
Linears outside the decoder layers (``lm_head``, ignored by default) go through ``quantize_head`` with the
final norm's input Hessian; embeddings stay float.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from llmopt.errors import UserError
from llmopt.models.registry import ArchSpec, spec_for
from llmopt.progress import SILENT, Progress
from llmopt.quant.capture import capture_layer0_inputs, collect, layer_out
from llmopt.quant.method import GroupContext, Method, QuantResult, method_for, one_thread
from llmopt.quant.modules import (check_targets, fold_scales, get_weight, is_ignored, is_linear, set_weight,
                                  sublayer_groups, untie)
from llmopt.quant.rtn import output_error, quantize

__all__ = ["LayerStore", "QuantResult", "quantize_model"]


class LayerStore:
    """Where the decoder layers' weights live between uses. This one: in the model (nothing to do)."""

    def captured(self, model: nn.Module) -> None:
        """Layer 0's calibration inputs were captured: what only that needed (embeddings) may be freed."""

    def load(self, index: int, layer: nn.Module) -> None:
        """Give ``layer`` its weights before it is calibrated."""

    def done(self, index: int, layer: nn.Module, result: QuantResult) -> None:
        """``layer`` is final (quantized, smoothed): keep it or write it out and free it."""


BLOCK_TOKENS = 4096  # calibration tokens of block-output objectives (AWQ): the first batches that hold them
BATCH_TOKENS = 512  # tokens per calibration forward (whole samples, at least one)


def _hidden_bytes(cached: list | None) -> int:
    return sum(h.numel() * h.element_size() for h, _, _ in cached) if cached else 0


def calibration_order(samples: int, seq_len: int) -> list[int]:
    """Sample order: the first ``BLOCK_TOKENS // seq_len`` interleave over the text (s, s + k, …), and so on."""
    k = -(-samples // max(1, BLOCK_TOKENS // seq_len))
    return [i for start in range(k) for i in range(start, samples, k)]


@torch.no_grad()
def quantize_model(model: nn.Module, config: Any, calib_ids: torch.Tensor | None,
                   progress: Progress = SILENT, batch_tokens: int = BATCH_TOKENS,
                   store: LayerStore | None = None) -> QuantResult:
    """Quantize ``model`` following ``config`` (a ``QuantizeConfig``); see the module doc.

    ``calib_ids`` (``[samples, seq_len]``) may be None only for an uncalibrated method (RTN; then no
    errors are recorded). With the default ``store`` the model keeps the dequantized weights.
    """
    store = store or LayerStore()
    spec = spec_for(getattr(model.config, "model_type", None))
    model.eval()  # no dropout while calibrating
    method = method_for(config)
    patterns = list(config.ignore)
    layers: nn.ModuleList = model.get_submodule(spec.layers_path)
    res = QuantResult()
    check_targets(model, spec)
    if calib_ids is None and method.calibrated:
        raise UserError(f"{method.name} needs calibration data")

    cached = None
    block_batches = 1
    if calib_ids is not None:
        samples, seq_len = calib_ids.shape
        batch = max(1, batch_tokens // seq_len)
        block_batches = -(-max(1, BLOCK_TOKENS // seq_len) // batch)
        t0 = time.perf_counter()
        cached = capture_layer0_inputs(model, layers, calib_ids[calibration_order(samples, seq_len)], batch)
        store.captured(model)
        res.calibration = {"samples": int(samples), "seq_len": int(seq_len),
                           "tokens": int(calib_ids.numel()), "batch": batch,
                           "capture_s": round(time.perf_counter() - t0, 3),
                           "activation_bytes": _hidden_bytes(cached) + _hidden_bytes(cached[:1]),
                           "activation_note": "one layer boundary's calibration hidden states (float32) plus one "
                                              f"batch of the next ({batch} x {seq_len} tokens per forward)"}

    groups = sublayer_groups(spec)
    smooth_by_first = {g.linears[0]: g for g in spec.smooth_groups}
    with progress.task(f"{method.name} int{method.bits}: decoder layers", total=len(layers)) as advance:
        for li, layer in enumerate(layers):
            t0 = time.perf_counter()
            store.load(li, layer)
            prefix = f"{spec.layers_path}.{li}."
            hooks: list[Any] = []
            try:
                for grp in groups:
                    names = [prefix + lin for lin in grp]
                    res.ignored += [n for n in names if is_ignored(n, patterns)]
                    targets = [lin for lin, n in zip(grp, names) if not is_ignored(n, patterns)]
                    if targets:
                        hooks += _group(method, layer, grp, targets, prefix, smooth_by_first.get(grp[0]), cached,
                                        res, block_batches)
                if cached is not None:
                    for i, (h, rest, kw) in enumerate(cached):  # each batch's output replaces its input
                        cached[i] = (layer_out(layer(h, *rest, **kw)), rest, kw)
                        del h
            finally:
                for hk in hooks:
                    hk.remove()
            store.done(li, layer, res)
            res.layer_seconds.append(round(time.perf_counter() - t0, 3))
            advance(1)

    _outside_layers(model, spec, patterns, method, res, cached)
    return res


def _group(method: Method, layer: nn.Module, grp: tuple[str, ...], targets: list[str], prefix: str,
           smooth: Any, cached: list | None, res: QuantResult, block_batches: int = 1) -> list[Any]:
    stats = None
    if cached is not None:
        block = method.block_of(smooth)
        block_mod = layer.get_submodule(block) if block else None
        stats = collect(layer, layer.get_submodule(grp[0]), cached, method.sample_every(res.calibration["tokens"]),
                        block_mod, block_batches)
        stats.block = block_mod
    with one_thread():
        return _hooks(method, layer, grp, targets, prefix, smooth, stats, res)


def _hooks(method: Method, layer: nn.Module, grp: tuple[str, ...], targets: list[str], prefix: str,
           smooth: Any, stats: Any, res: QuantResult) -> list[Any]:
    ctx = GroupContext(layer=layer, prefix=prefix, linears=grp, targets=targets, smooth=smooth, stats=stats,
                       result=res, w_orig={t: get_weight(layer.get_submodule(t)) for t in targets})
    found = method.smooth(ctx) if stats is not None else None
    if found is not None:
        ctx.col_scale, info = found
        info.update(prev=prefix + smooth.prev, linears=[prefix + t for t in smooth.linears],
                    scale_min=float(ctx.col_scale.min()), scale_max=float(ctx.col_scale.max()))
        res.smoothing[prefix + smooth.prev] = info
        fold_scales(layer, smooth, ctx.col_scale, res.qtensors, prefix)
    mods = {lin: layer.get_submodule(lin) for lin in targets}
    # after folding (without it, the weights are w_orig's copies: the methods do not modify their inputs)
    qts = method.quantize_group(ctx, ctx.w_orig if found is None else {lin: get_weight(m) for lin, m in mods.items()})
    for lin in targets:
        qt = qts[lin]
        res.qtensors[prefix + lin] = qt
        set_weight(mods[lin], qt.dequantize())
        if stats is not None:
            res.errors[prefix + lin] = method.error(ctx, lin, qt)
    return method.after_group(ctx) if stats is not None else []


FINAL_NORMS = ("model.norm", "transformer.ln_f")  # where the decoder's final norm lives, by family


def _final_norm(model: nn.Module) -> nn.Module | None:
    for name in FINAL_NORMS:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    return None


def outside_linears(model: nn.Module, spec: ArchSpec) -> list[str]:
    """Linear modules outside the decoder layers (lm_head)."""
    inside = spec.layers_path + "."
    return [n for n, m in model.named_modules() if n and not n.startswith(inside) and is_linear(m)]


def _outside_layers(model: nn.Module, spec: ArchSpec, patterns: list[str], method: Method, res: QuantResult,
                    final_hidden: list | None) -> None:
    """Weight-only quantization of linears outside the decoder layers (lm_head) unless ignored; with
    calibration data the head's inputs (final norm of the last layer's quantized outputs) give its Hessian."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    norm = _final_norm(model)
    for name in outside_linears(model, spec):
        m = model.get_submodule(name)
        if is_ignored(name, patterns):
            res.ignored.append(name)
            continue
        if emb is not None and m.weight is getattr(emb, "weight", None):
            untie(m)
            res.untied_lm_head = True
        w = get_weight(m)
        h = None
        if final_hidden is not None and m is head and norm is not None:
            h = torch.zeros(w.shape[1], w.shape[1])
            for hidden, _, _ in final_hidden:
                x = norm(hidden).reshape(-1, w.shape[1]).float()
                h.addmm_(x.t(), x)
        with one_thread():
            qt = method.quantize_head(w, h)
        if h is not None:
            res.errors[name] = {"method": output_error(w, qt.dequantize(), h),
                                "rtn": output_error(w, quantize(w, method.bits, method.group_size,
                                                                method.symmetric).dequantize(), h)}
        res.qtensors[name] = qt
        set_weight(m, qt.dequantize())

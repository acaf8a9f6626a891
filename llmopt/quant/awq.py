"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): protect the weight columns that see large activations by scaling them up before
group-wise quantization, and fold the inverse scale into the op that produces the activation.

For linears sharing one input X with per-channel mean magnitude ``m_j = mean|X_j|``:

    s(r) = m^r / sqrt(max(m^r) · min(m^r)),   r ∈ {0, 1/n, …, (n-1)/n}

and ``r`` minimizes the output error of the quantized scaled weights ``Q(W diag(s)) diag(s)⁻¹``:

* :func:`search_scale` — summed over the linears, ``Σ ||W X - Q(W s) s⁻¹ X||²``, exactly over all
  calibration tokens through ``H = Σ x xᵀ`` (``||D X||² = tr(D H Dᵀ)``);
* :func:`search_scale_with` — any loss; the driver passes the output error of the block the linears
  belong to (self-attention for q/k/v, the MLP for gate/up), as the reference implementation does.

``r = 0`` is plain RTN, so the chosen scale is never worse than RTN on that objective. Then the
clipping search (AWQ's ``auto_clip``): per output row and group, shrink the quantization range by a
factor in [1 - max_shrink, 1], first minimizing each group's own output error (block-diagonal part of
H, the reference's objective), then refined by coordinate descent over the groups with the full H.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmopt.models.registry import SmoothGroup
from llmopt.quant.capture import layer_out
from llmopt.quant.method import GroupContext, Method
from llmopt.quant.modules import set_weight
from llmopt.quant.rtn import QTensor, fake_quantize, group_count, quantize


def _hessian_loss(d: torch.Tensor, h: torch.Tensor) -> float:
    return float(((d @ h) * d).sum())


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], hessian: torch.Tensor, act_mean_abs: torch.Tensor, bits: int,
                 group_size: int | None, symmetric: bool, grid: int = 20) -> tuple[torch.Tensor, dict]:
    """Best per-input-channel scale ``s`` for ``weights`` (``[out, in]``, same input) and the search log."""
    h = hessian.float()
    ws = [w.detach().float() for w in weights]

    def loss(s: torch.Tensor) -> float:
        return sum(_hessian_loss(w - fake_quantize(w * s, bits, group_size, symmetric) / s, h) for w in ws)

    return _grid_search(act_mean_abs, loss, grid)


@torch.no_grad()
def search_scale_with(act_mean_abs: torch.Tensor, loss_fn, grid: int = 20) -> tuple[torch.Tensor, dict]:
    """Same grid as :func:`search_scale` with an arbitrary ``loss_fn(s)`` (e.g. a block's output error)."""
    best, info = _grid_search(act_mean_abs, loss_fn, grid)
    return best, {**info, "objective": "block output"}


def _grid_search(act_mean_abs: torch.Tensor, loss_fn, grid: int) -> tuple[torch.Tensor, dict]:  # noqa: ANN001
    """s = mean|x|^r for r in [0, 1) on ``grid`` points, normalised; the one minimising ``loss_fn(s)``."""
    m = act_mean_abs.float().clamp(min=1e-4)
    best = (float("inf"), 0.0, torch.ones_like(m))
    losses = []
    for i in range(grid):
        r = i / grid
        s = m.pow(r)
        s = s / (s.max() * s.min()).sqrt()
        loss = float(loss_fn(s))
        losses.append(loss)
        if loss < best[0]:
            best = (loss, r, s)
    return best[2], {"ratio": best[1], "loss": best[0], "loss_unscaled": losses[0]}


@torch.no_grad()
def search_clip(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None,
                symmetric: bool, grid: int = 20, max_shrink: float = 0.5, passes: int = 2) -> torch.Tensor:
    """Per (row, group) range factor ``[out, ngroups]`` minimizing the row's output error.

    First each group alone (the block-diagonal part of H, AWQ's ``auto_clip`` objective); then
    ``passes`` rounds of coordinate descent over the groups with the full H, so the choice for one group
    accounts for the errors already made in the others (never increases the error).
    """
    w = weight.detach().float()
    h = hessian.float()
    out_f, in_f = w.shape
    ng = group_count(in_f, group_size)
    g = in_f if ng == 1 else group_size
    if g * ng != in_f:  # partial last group: zero columns leave its range and its error unchanged
        pad = g * ng - in_f
        w = torch.nn.functional.pad(w, (0, pad))
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
        in_f = g * ng
    hb = torch.stack([h[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(ng)])  # [ng, g, g]
    wg = w.reshape(out_f, ng, g)
    ratios = [1 - i / grid for i in range(max(1, int(max_shrink * grid)))]
    deltas = []  # per ratio: [out, ng, g] quantization error with that range factor everywhere
    best_err = torch.full((out_f, ng), float("inf"))
    idx = torch.zeros(out_f, ng, dtype=torch.long)  # index into ratios
    for ri, r in enumerate(ratios):
        clip = torch.full((out_f, ng), r)
        d = wg - fake_quantize(w, bits, group_size, symmetric, clip=clip).reshape(out_f, ng, g)
        deltas.append(d)
        err = torch.einsum("ogi,gij,ogj->og", d, hb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        idx = torch.where(better, torch.full_like(idx, ri), idx)
    table = torch.tensor(ratios, dtype=torch.float32)
    if ng == 1 or passes <= 0:
        return table[idx]
    # coordinate descent with the cross-group terms of H
    stack = torch.stack(deltas)  # [R, out, ng, g]
    cur = torch.gather(stack, 0, idx[None, :, :, None].expand(1, out_f, ng, g))[0]  # [out, ng, g]
    for _ in range(passes):
        for k in range(ng):
            sl = slice(k * g, (k + 1) * g)
            full = cur.reshape(out_f, in_f)
            cross = full @ h[:, sl] - cur[:, k] @ hb[k]  # [out, g]: (H d without group k) restricted to k
            dk = stack[:, :, k]  # [R, out, g]
            err = torch.einsum("rog,gh,roh->ro", dk, hb[k], dk) + 2 * (dk * cross[None]).sum(-1)
            choice = err.argmin(0)  # [out]
            cur[:, k] = dk[choice, torch.arange(out_f)]
            idx[:, k] = choice
    return table[idx]


def block_of(smooth: SmoothGroup | None) -> str | None:
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


def block_loss(stats: Any, mods: dict[str, nn.Module], w_orig: dict[str, torch.Tensor], bits: int,
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


class AWQ(Method):
    """Scales searched per smooth group (on the block output, as the reference does, else summed over the
    linears through H) and folded into the previous op; then a clipping search per linear (not for q/k)."""

    name = "awq"
    calibrated = True
    BLOCK_LOSS = True  # the scale search compares the block output (self_attn / mlp)

    def block_of(self, smooth: SmoothGroup | None) -> str | None:
        return block_of(smooth) if self.BLOCK_LOSS else None

    def smooth(self, ctx: GroupContext) -> tuple[torch.Tensor, dict] | None:
        if ctx.smooth is None:
            return None
        st, grid = ctx.stats, self.config.awq_grid
        if st.block is not None and st.block_inputs:
            mods = {t: ctx.layer.get_submodule(t) for t in ctx.targets}
            return search_scale_with(st.mean_abs, block_loss(st, mods, ctx.w_orig, self.bits, self.group_size,
                                                             self.symmetric), grid=grid)
        return search_scale([ctx.w_orig[t] for t in ctx.targets], st.h, st.mean_abs, self.bits, self.group_size,
                            self.symmetric, grid=grid)

    def quantize_linear(self, ctx: GroupContext | None, lin: str, w: torch.Tensor) -> QTensor:
        clip = None
        if not any(k in lin for k in ("q_proj", "k_proj", "qkv", "c_attn")):  # AWQ skips q/k clipping
            s = ctx.col_scale
            h_s = ctx.stats.h if s is None else ctx.stats.h / s.unsqueeze(0) / s.unsqueeze(1)
            clip = search_clip(w, h_s, self.bits, self.group_size, self.symmetric, grid=self.config.awq_grid)
        return quantize(w, self.bits, self.group_size, self.symmetric, clip)

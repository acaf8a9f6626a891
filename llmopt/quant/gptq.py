"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), for one linear layer.

Given the layer's calibration inputs through ``H = Σ x xᵀ`` (proportional to the paper's ``2 X Xᵀ``;
the constant does not matter since dampening is relative), quantize the columns of ``W`` one at a
time and push each column's rounding error onto the not-yet-quantized columns through the inverse
Hessian, which minimizes ``||W X - Q X||²`` greedily:

* dead inputs (``H_jj == 0``, never active on the calibration data) get ``H_jj = 1`` and ``W[:, j] = 0``;
* dampening: ``H += damp · mean(diag H) · I`` (retried with 10× more if Cholesky still fails);
* the factorization is float32 (as in the reference implementation), in place in one working copy of H,
  with a float64 retry at the same dampening before it grows;
* ``Hinv = cholesky(H⁻¹, upper=True)``: the rows of the upper Cholesky factor of the inverse are
  exactly the OBS update vectors for the sequential elimination order;
* lazy batch updates: errors are applied inside a block of ``block_size`` columns immediately and to the
  rest of the matrix once per block (one matmul);
* a group size that does not divide the input width leaves the last group partial (its scale comes
  from its real columns), the layout of :mod:`llmopt.quant.rtn`;
* act-order (``act_order=True``, the stage's default as in llm-compressor's "static" order): columns are
  processed by decreasing ``H_jj``; groups stay contiguous runs of ``group_size`` ORIGINAL input columns
  (the layout ONNX block-wise ``DequantizeLinear`` needs, no ``g_idx``), so a group's scale is fixed when
  the first of its columns is reached; the permuted H is gathered into the factorization's one working
  copy and W is permuted in its own memory, so act-order holds no more than the natural order;
* group scales are computed when a group is entered, from the group's CURRENT weights (with all error
  updates so far, including the block's pending lazy updates), as in the reference implementation.
"""

from __future__ import annotations

import torch

from llmopt.quant.method import GroupContext, Method
from llmopt.quant.rtn import QTensor, compute_qparams, group_count, qrange


def _factor_in_place(a: torch.Tensor, lam: float) -> bool:
    """``a`` (symmetric, row-major) := the upper Cholesky factor of ``(a + λI)⁻¹``; False if not positive definite.

    LAPACK works in place on the column-major view ``a.mT`` (the same matrix, by symmetry), so no n×n copy is
    made: lower factor ``L₁`` of ``a + λI``, then ``(L₁L₁ᵀ)⁻¹``, then its lower factor ``L₂``, which read
    row-major is ``L₂ᵀ`` — the upper factor ``U`` with ``UᵀU = (a + λI)⁻¹``."""
    a.diagonal().add_(lam)
    v = a.mT
    info = torch.zeros((), dtype=torch.int32)
    torch.linalg.cholesky_ex(v, out=(v, info))
    if int(info) != 0:
        return False
    torch.cholesky_inverse(v, out=v)
    torch.linalg.cholesky_ex(v, out=(v, info))
    return int(info) == 0


def _working_copy(h: torch.Tensor, dtype: torch.dtype, perm: torch.Tensor | None, rows: int = 512) -> torch.Tensor:
    """``h`` (or ``h[perm][:, perm]``) as a new contiguous ``dtype`` tensor: the permuted copy is gathered a
    block of rows at a time, so no second n×n tensor exists beside it."""
    if perm is None:
        return h.to(dtype, copy=True).contiguous()
    out = torch.empty(h.shape, dtype=dtype)
    for i in range(0, h.shape[0], rows):
        out[i:i + rows] = h.index_select(0, perm[i:i + rows]).index_select(1, perm)
    return out


def inverse_hessian_factor(h: torch.Tensor, damp: float, dead: torch.Tensor | None = None,
                           perm: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, in ``h``'s dtype, of
    ``H[perm][:, perm]`` when ``perm`` is given (``dead`` is then in that order too).

    ``h`` is not modified: one n×n working copy is factorized in place (the 5632-wide down_proj Hessian of a
    1.1B model: 127 MB in float32, where the float64 out-of-place chain held ~1.3 GB). ``dead`` inputs get
    ``H_jj = 1`` in that copy. If the float32 factorization fails, float64 is tried at the same λ, then λ
    grows 10× (up to 6 times)."""
    out_dtype = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    diag = torch.diagonal(h).double()
    if perm is not None:
        diag = diag[perm]
    if dead is not None:
        diag = torch.where(dead, torch.ones_like(diag), diag)
    mean_diag = float(diag.mean())
    lam = damp * (mean_diag if mean_diag > 0 else 1.0)
    dtypes = list(dict.fromkeys([out_dtype, torch.float64]))
    for _ in range(6):
        for dtype in dtypes:
            a = _working_copy(h, dtype, perm)
            if dead is not None:
                a.diagonal()[dead] = 1.0
            if _factor_in_place(a, lam):
                return a.to(out_dtype)
            del a
        lam *= 10
    raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even with heavy dampening")


def _permute_rows_(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x := x[perm]`` in place, one cycle of the permutation at a time (one row of scratch)."""
    p = perm.tolist()
    seen = [False] * len(p)
    for start in range(len(p)):
        if seen[start] or p[start] == start:
            continue
        first = x[start].clone()
        j = start
        while True:
            seen[j] = True
            k = p[j]
            if k == start:
                x[j] = first
                break
            x[j] = x[k]
            j = k
    return x


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  symmetric: bool = True, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, consume: bool = False) -> QTensor:
    """Quantize ``weight`` ``[out, in]`` with GPTQ given ``hessian`` ``[in, in]`` of its inputs.

    ``consume``: ``weight`` is the caller's scratch, the transpose of a contiguous float32 ``[in, out]``
    tensor, and GPTQ works in that memory instead of a copy (which ``weight`` otherwise is not)."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"shapes do not match: weight {tuple(weight.shape)}, hessian {tuple(hessian.shape)}")
    out_f, in_f = weight.shape
    ng = group_count(in_f, group_size)
    gsize = in_f if ng == 1 else group_size  # the last group may be partial
    qmin, qmax = qrange(bits)

    H = hessian.detach()
    if H.dtype not in (torch.float32, torch.float64):
        H = H.float()
    dead0 = torch.diagonal(H) == 0  # never active on the calibration data: H_jj := 1, W[:, j] := 0
    dead = dead0
    if act_order:
        diag = torch.where(dead0, torch.ones((), dtype=H.dtype), torch.diagonal(H))
        perm = torch.argsort(diag, descending=True, stable=True)
        dead = dead0[perm]
    else:
        perm = torch.arange(in_f)
    invperm = torch.argsort(perm)
    Hinv = inverse_hessian_factor(H, damp, dead, perm if act_order else None).float()
    del H

    # work on the transpose: a column of W is a contiguous row here (rank-1 updates are BLAS `ger`)
    Wt = weight.detach().t()
    if not (consume and Wt.dtype == torch.float32 and Wt.is_contiguous()):
        Wt = torch.empty(in_f, out_f).copy_(Wt)  # [in, out], the one working copy of W
    Wt[dead0] = 0.0
    if act_order:
        _permute_rows_(Wt, perm)  # [in (permuted), out], in the same memory
    scale = torch.zeros(ng, out_f)
    zero = torch.zeros(ng, out_f) if not symmetric else None
    entered = torch.zeros(ng, dtype=torch.bool)
    Q = torch.zeros(in_f, out_f, dtype=torch.int8)  # permuted column order, transposed

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        count = i2 - i1
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros(count, out_f)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            g = int(perm[i1 + i]) // gsize
            if not entered[g]:
                # current values of the group's columns (all still unquantized), pending updates included
                pos = invperm[g * gsize:(g + 1) * gsize]
                cur = torch.empty(len(pos), out_f)
                inblk = pos < i2
                if inblk.any():
                    cur[inblk] = W1[pos[inblk] - i1]
                if (~inblk).any():
                    later = pos[~inblk]
                    cur[~inblk] = Wt[later] - Hinv[i1:i1 + i, later].t() @ Err1[:i]
                s, z = compute_qparams(cur.t(), bits, symmetric)
                scale[g] = s.squeeze(-1)
                if zero is not None:
                    zero[g] = z.squeeze(-1).float()
                entered[g] = True
            s = scale[g]
            w = W1[i]
            qi = torch.round(w / s)
            if zero is not None:
                z = zero[g]
                qi = (qi + z).clamp_(qmin, qmax)
                dq = (qi - z) * s
            else:
                qi = qi.clamp_(qmin, qmax)
                dq = qi * s
            Q[i1 + i] = qi.to(torch.int8)
            err = (w - dq) / Hinv1[i, i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
            Err1[i] = err
        if i2 < in_f:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)

    del Wt, Hinv
    if act_order:
        Q = Q[invperm]
    return QTensor(q=Q.t().contiguous(), scale=scale.t().contiguous(),
                   zero_point=None if zero is None else zero.t().to(torch.int8).contiguous(), bits=bits,
                   group_size=None if ng == 1 else group_size, symmetric=symmetric)


class GPTQ(Method):
    """Each linear quantized with :func:`gptq_quantize` from its group's input Hessian (true-sequential:
    the Hessian is collected after the earlier groups of the layer were quantized); lm_head too, from the
    final norm's outputs, when it is not ignored."""

    name = "gptq"
    calibrated = True

    def _gptq(self, w: torch.Tensor, h: torch.Tensor, consume: bool = False) -> QTensor:
        c = self.config
        return gptq_quantize(w, h, self.bits, self.group_size, self.symmetric, damp=c.damp,
                             block_size=c.block_size, act_order=c.act_order, consume=consume)

    def quantize_linear(self, ctx: GroupContext | None, lin: str, w: torch.Tensor) -> QTensor:
        return self._gptq(w, ctx.stats.h)

    def quantize_group(self, ctx: GroupContext, weights: dict[str, torch.Tensor]) -> dict[str, QTensor]:
        """Linears sharing an input share H, and GPTQ treats the rows of W independently given H (same
        inverse factor, same column order, scales per row): one call on their rows stacked (q/k/v, gate/up)
        gives each linear exactly its own result, with one Cholesky and one column loop per group."""
        if len(weights) == 1:
            return super().quantize_group(ctx, weights)
        names = list(weights)
        stacked_t = torch.cat([weights[n].t() for n in names], dim=1)  # [in, rows of all]: GPTQ's scratch
        joint = self._gptq(stacked_t.t(), ctx.stats.h, consume=True)
        del stacked_t
        out, start = {}, 0
        for n in names:
            rows = slice(start, start + weights[n].shape[0])
            start = rows.stop
            out[n] = QTensor(q=joint.q[rows].contiguous(), scale=joint.scale[rows].contiguous(),
                             zero_point=None if joint.zero_point is None else joint.zero_point[rows].contiguous(),
                             bits=joint.bits, group_size=joint.group_size, symmetric=joint.symmetric)
        return out

    def quantize_head(self, w: torch.Tensor, h: torch.Tensor | None) -> QTensor:
        return self._gptq(w, h) if h is not None else super().quantize_head(w, h)

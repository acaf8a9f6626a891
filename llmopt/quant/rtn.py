"""Round-to-nearest weight quantization and the ``QTensor`` every method produces.

Conventions (shared by GPTQ, AWQ, SmoothQuant, the checkpoint format and the ONNX export):

* weights are ``[out, in]`` (``nn.Linear`` orientation), quantized along the input dimension:
  one scale per output row (``group_size=None``, "per channel") or one per row and per block of
  ``group_size`` consecutive input columns (``scale`` is ``[out, ceil(in / group_size)]``); when
  ``group_size`` does not divide ``in`` the LAST group is partial (SmolLM2's 576 inputs with groups of
  128: four groups of 128 and one of 64), exactly as ONNX block-wise ``DequantizeLinear`` and
  ``MatMulNBits`` define it; its parameters come from its real columns only;
* integers are always SIGNED: ``[-2^(b-1), 2^(b-1) - 1]`` (int8: [-128, 127], int4: [-8, 7]), stored
  unpacked in an int8 tensor here (see :mod:`llmopt.quant.packing` for the 4-bit file layout);
* dequantization is ONNX ``DequantizeLinear``'s: ``w = (q - zero_point) * scale``;
* symmetric: ``scale = absmax / (2^(b-1) - 1)``, no zero point (it is 0); q never reaches -2^(b-1);
* asymmetric: ``scale = (max - min) / (2^b - 1)`` over a range that always contains 0, and an int8 zero
  point in the same signed range, ``zero_point = qmin - round(min / scale)``;
* an all-zero row/group gets ``scale = 1`` (and q = zero point), so scales are never 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass
class QTensor:
    """An integer weight with its scales: ``dequantize() == (q - zero_point) * scale`` group-wise."""

    q: torch.Tensor                   # int8 [out, in]
    scale: torch.Tensor               # float32 [out, in // group_size] or [out, 1]
    zero_point: torch.Tensor | None   # int8, same shape as scale; None when symmetric
    bits: int
    group_size: int | None            # None = one scale per output channel
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def partial_group(self) -> int | None:
        """Width of the last group when the group size does not divide the input width, else None."""
        if self.group_size is None or self.shape[1] % self.group_size == 0:
            return None
        return self.shape[1] % self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_values(self.q, self.scale, self.zero_point, self.group_size).to(dtype)

    def scale_rows(self, factor: torch.Tensor) -> None:
        """Multiply output row ``i`` of the dequantized weight by ``factor[i] > 0``, exactly (scales only)."""
        self.scale = (self.scale * factor.reshape(-1, 1).to(self.scale.dtype)).contiguous()


def group_count(in_features: int, group_size: int | None) -> int:
    """Groups per row: 1 (per channel) when ``group_size`` is None or not below ``in_features``, else
    ``ceil(in_features / group_size)`` (the last one partial when it does not divide)."""
    if group_size is None or group_size >= in_features:
        return 1
    return -(-in_features // group_size)


def effective_group(in_features: int, group_size: int | None) -> int | None:
    """The group size a QTensor records: None when one group spans the row."""
    return None if group_count(in_features, group_size) == 1 else group_size


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[out, n]`` → ``[out, ngroups, group_size]`` (one group of ``n`` when None); a partial last group is
    padded with zeros, which leave absmax and the asymmetric range (it always contains 0) unchanged."""
    out, n = x.shape
    ng = group_count(n, group_size)
    g = n if ng == 1 else group_size
    if g * ng != n:
        x = torch.nn.functional.pad(x, (0, g * ng - n))
    return x.reshape(out, ng, g)


def compute_qparams(w: torch.Tensor, bits: int, symmetric: bool,
                    clip: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of ``w`` (``[..., k]`` → ``[..., 1]``).

    ``clip`` (scalar or broadcastable to ``[..., 1]``) shrinks the range before computing the scale
    (AWQ's clipping search); values beyond it then saturate.
    """
    qmin, qmax = qrange(bits)
    w = w.float()
    if symmetric:
        lo, hi = torch.aminmax(w, dim=-1, keepdim=True)  # one pass instead of abs() then amax()
        amax = torch.maximum(-lo, hi)
        if clip is not None:
            amax = amax * clip
        scale = amax / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, None
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zp.to(torch.int8)


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    bits: int) -> torch.Tensor:
    """Integers for ``w`` given per-row/per-group parameters broadcastable against ``w`` (grouped view)."""
    qmin, qmax = qrange(bits)
    q = w.float() / scale  # a fresh tensor: the rest is in place
    q.round_()
    if zero_point is not None:
        q += zero_point.float()
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      group_size: int | None = None) -> torch.Tensor:
    """``(q - zero_point) * scale`` with ``scale`` ``[out, ngroups]`` applied to ``q`` ``[out, in]``: column
    ``i`` uses group ``i // group_size`` (``group_size`` None: ``in / ngroups``, which must divide)."""
    out_f, n = q.shape
    ng = scale.shape[-1]
    if group_size is None and ng > 1:
        if n % ng:
            raise ValueError(f"{ng} groups need a group size for {n} columns")
        group_size = n // ng
    if group_count(n, group_size) != ng:
        raise ValueError(f"{ng} scale columns do not match {n} columns in groups of {group_size}")
    qg = _grouped(q.float(), group_size if ng > 1 else None)
    if zero_point is not None:
        qg = qg - zero_point.float().unsqueeze(-1)
    return (qg * scale.float().unsqueeze(-1)).reshape(out_f, -1)[:, :n]


def quantize(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
             clip: torch.Tensor | None = None) -> QTensor:
    """Round-to-nearest ``w`` ``[out, in]``; ``clip`` is an optional ``[out, ngroups]`` range factor."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    wg = _grouped(w.float(), group_size)
    c = clip.unsqueeze(-1) if isinstance(clip, torch.Tensor) else clip
    scale, zp = compute_qparams(wg, bits, symmetric, c)
    q = quantize_values(wg, scale, zp, bits).reshape(out_f, -1)[:, :in_f].contiguous()
    return QTensor(q=q, scale=scale.squeeze(-1).contiguous(),
                   zero_point=None if zp is None else zp.squeeze(-1).contiguous(),
                   bits=bits, group_size=effective_group(in_f, group_size), symmetric=symmetric)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                  clip: torch.Tensor | None = None) -> torch.Tensor:
    return quantize(w, bits, group_size, symmetric, clip).dequantize(torch.float32)


def output_error(w_ref: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor, block: int = 256,
                 rows: int = 256) -> float:
    """Relative output MSE ``||(W - Wq) X||² / ||W X||²`` from ``H = Σ x xᵀ`` (no need to keep X).

    Float64 throughout, ``block`` Hessian columns and ``rows`` weight rows at a time: for a 5632-wide Hessian
    ~50 MB at once rather than a double copy of H (254 MB) and of the weights and their products."""
    n = hessian.shape[0]
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for j in range(0, n, block):
        hj = hessian[:, j:j + block].double()
        for r in range(0, w_ref.shape[0], rows):
            wr = w_ref[r:r + rows].double()
            d = wr - w_q[r:r + rows].double()
            num += ((d @ hj) * d[:, j:j + block]).sum()
            den += ((wr @ hj) * wr[:, j:j + block]).sum()
    return float(num / den) if den > 0 else float(num)

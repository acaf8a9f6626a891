"""Pack 4-bit integers two per byte, in the layout ONNX uses for INT4 / UINT4 tensors.

ONNX stores 4-bit tensors flattened in row-major order, two elements per byte: the element with the
EVEN flat index in the LOW nibble, the odd one in the high nibble. Signed values are stored as 4-bit
two's complement (``-1`` is ``0xF``). Packing along the last dimension of a tensor whose last dimension
is even gives exactly that flat layout, so the bytes of ``pack_int4(q)`` for a ``[out, in]`` weight can be
written as the raw data of an ONNX ``INT4`` (signed) or ``UINT4`` (unsigned) ``[out, in]`` initializer.

An odd last dimension is rejected: a row would share its last byte with the next row, which the
checkpoint format never needs.
"""

from __future__ import annotations

import torch


def int4_range(signed: bool) -> tuple[int, int]:
    return (-8, 7) if signed else (0, 15)


def pack_int4(q: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """``[..., n]`` integers in the int4 (or uint4) range → ``[..., n // 2]`` uint8; low nibble = even index."""
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"pack_int4 expects an integer tensor, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    lo, hi = int4_range(signed)
    if q.numel():
        mn, mx = torch.aminmax(q)
        if int(mn) < lo or int(mx) > hi:
            raise ValueError(f"values outside the {'int4' if signed else 'uint4'} range [{lo}, {hi}]")
    # the low byte of each value: two's complement for negatives (int8 viewed as uint8 is exactly that)
    u = q.view(torch.uint8) if q.dtype in (torch.int8, torch.uint8) else q.to(torch.int16).bitwise_and(0xFF).to(torch.uint8)
    return ((u[..., 0::2] & 0xF) | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., m]`` uint8 → ``[..., 2 m]`` int8."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    v = packed.to(torch.int16)
    low = v & 0xF
    high = (v >> 4) & 0xF
    if signed:
        low = torch.where(low >= 8, low - 16, low)
        high = torch.where(high >= 8, high - 16, high)
    out = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return out.to(torch.int8)

"""A quantization method is an object whose hooks the method-agnostic drivers call.

* :mod:`llmopt.quant.stream` (no model, no data) calls :meth:`Method.quantize_linear` on each linear's
  weight as it streams from the checkpoint — RTN, which is why it takes seconds;
* :mod:`llmopt.quant.calibrate` walks the decoder layers one at a time over calibration activations and,
  for each sub-layer group of linears that share an input (q/k/v, o, gate/up, down), calls
  :meth:`~Method.smooth` (AWQ / SmoothQuant fold per-channel scales), :meth:`~Method.quantize_group`
  (by default :meth:`~Method.quantize_linear` per linear),
  :meth:`~Method.error` and :meth:`~Method.after_group`; then :meth:`~Method.quantize_head` for the
  linears outside the layers (lm_head) when they are not ignored.

The base class is round-to-nearest. A new method is a new subclass in its own file plus one line in
:data:`METHODS` (llm-compressor's modifiers; see ../shared/STYLE.md).
"""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from llmopt.models.registry import SmoothGroup
from llmopt.quant.rtn import QTensor, output_error, quantize

METHODS = {"rtn": "llmopt.quant.method:RTN", "gptq": "llmopt.quant.gptq:GPTQ", "awq": "llmopt.quant.awq:AWQ",
           "smoothquant": "llmopt.quant.smoothquant:SmoothQuant"}


@dataclass
class QuantResult:
    """What a driver produced; with :func:`~llmopt.quant.calibrate.quantize_model` the model itself also
    holds the dequantized weights."""

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
        ratios = [m / r for m, r in pairs if r > 0]
        return {
            "linears": len(pairs),
            "mean_rel_mse": sum(m for m, _ in pairs) / len(pairs),
            "mean_rel_mse_rtn": sum(r for _, r in pairs) / len(pairs),
            "geomean_ratio_vs_rtn": math.exp(sum(math.log(max(x, 1e-30)) for x in ratios) / len(ratios)) if ratios else None,
            "worse_than_rtn": sum(1 for m, r in pairs if m > r * (1 + 1e-6)),
        }


@dataclass
class GroupContext:
    """One sub-layer group of one decoder layer, as the calibrating driver hands it to the hooks."""

    layer: nn.Module
    prefix: str                         # "model.layers.3."
    linears: tuple[str, ...]            # the group's linears, relative to the layer
    targets: list[str]                  # those not ignored
    smooth: SmoothGroup | None          # the smooth group starting with this group, if any
    stats: Any                          # llmopt.quant.capture.Stats of the group's input
    result: QuantResult
    w_orig: dict[str, torch.Tensor]     # float [out, in] weights before smoothing
    col_scale: torch.Tensor | None = None  # set by the driver after :meth:`Method.smooth`


class Method:
    """Round-to-nearest; the hooks' defaults. Subclasses override what their algorithm changes."""

    name: ClassVar[str] = "rtn"
    calibrated: ClassVar[bool] = False   # needs calibration activations (the layer-walking driver)
    activations: ClassVar[bool] = False  # also quantizes linear inputs (static scales in the checkpoint)

    def __init__(self, config: Any) -> None:
        self.config = config
        self.bits: int = config.bits
        self.group_size: int | None = None if config.bits == 8 else config.group_size
        self.symmetric: bool = config.symmetric

    # what the calibrating driver collects for a group
    def sample_every(self, total_tokens: int) -> int:
        """Keep every n-th token row of the group's input (0: none); SmoothQuant measures W8A8 errors on it."""
        return 0

    def block_of(self, smooth: SmoothGroup | None) -> str | None:
        """A module (relative to the layer) whose inputs the driver records for a block-output objective."""
        return None

    # hooks
    def smooth(self, ctx: GroupContext) -> tuple[torch.Tensor, dict] | None:
        """Per-input-channel scales to fold into ``ctx.smooth`` (and the search log), or None."""
        return None

    def quantize_linear(self, ctx: GroupContext | None, lin: str, w: torch.Tensor) -> QTensor:
        """The quantized ``w`` ``[out, in]`` (float32, after smoothing) of linear ``lin``."""
        return quantize(w, self.bits, self.group_size, self.symmetric)

    def quantize_group(self, ctx: GroupContext, weights: dict[str, torch.Tensor]) -> dict[str, QTensor]:
        """The group's linears (name → float32 ``[out, in]`` after smoothing), quantized."""
        return {lin: self.quantize_linear(ctx, lin, w) for lin, w in weights.items()}

    def error(self, ctx: GroupContext, lin: str, qt: QTensor) -> dict:
        """Relative output errors of the method and of RTN on the group's calibration inputs."""
        w0 = ctx.w_orig[lin]
        w_eff = qt.dequantize()
        if ctx.col_scale is not None:
            w_eff = w_eff / ctx.col_scale.unsqueeze(0)
        err = output_error(w0, w_eff, ctx.stats.h)
        del w_eff  # one float copy of the weight at a time
        rtn = quantize(w0, self.bits, self.group_size, self.symmetric).dequantize()
        return {"method": err, "rtn": output_error(w0, rtn, ctx.stats.h)}

    def after_group(self, ctx: GroupContext) -> list[Any]:
        """Forward hooks to keep on the layer until it is done (SmoothQuant: activation fake-quant)."""
        return []

    def quantize_head(self, w: torch.Tensor, h: torch.Tensor | None) -> QTensor:
        """A linear outside the decoder layers (lm_head); ``h``: its input Hessian when calibrated."""
        return quantize(w, self.bits, self.group_size, self.symmetric)


class RTN(Method):
    """Round-to-nearest: needs no model and no data (errors on calibration data only when asked)."""


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the per-linear algorithms on one intra-op thread. Their ops are small (GPTQ's column updates,
    RTN's element-wise passes), and OpenMP's synchronisation dominates them: on this 2-core machine GPTQ of
    a 576x1536 linear took 0.7 s on one thread and 11 s on two while other jobs ran (RTN: 4 vs 50 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def method_for(config: Any) -> Method:
    module, cls = METHODS[config.method].split(":")
    return getattr(importlib.import_module(module), cls)(config)

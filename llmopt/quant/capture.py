"""Calibration data and activation capture: token windows of the calibration text, the inputs of decoder
layer 0 (recorded by a "catcher" standing in for it), and the per-group input statistics collected with
forward pre-hooks that stop the layer forward once the group's input was seen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmopt.errors import UserError
from llmopt.quant.modules import get_weight


def calibration_ids(text: str, tokenizer: Any, samples: int, seq_len: int) -> torch.Tensor:
    """``[samples, seq_len]`` token ids: windows at evenly spaced offsets of the tokenized text."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return windows(ids, samples, seq_len)


def windows(ids: list[int] | torch.Tensor, samples: int, seq_len: int) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < seq_len:
        raise UserError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}",
                        "use a longer calibration text or a smaller --seq-len")
    span = ids.numel() - seq_len
    starts = [round(i * span / (samples - 1)) if samples > 1 else 0 for i in range(samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


class _Stop(Exception):
    """Raised by a collection hook to end the layer forward once its input was seen."""


class Stats:
    """Input statistics of one linear group: Hessian, per-channel mean/max |x|, optional token sample."""

    def __init__(self, n: int, sample_every: int = 0) -> None:
        self.h = torch.zeros(n, n)
        self.abs_sum = torch.zeros(n, dtype=torch.float64)
        self.absmax = torch.zeros(n)
        self.count = 0
        self.sample_every = sample_every
        self.samples: list[torch.Tensor] = []
        self.block: nn.Module | None = None
        self.block_inputs: list[tuple[tuple, dict]] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.t(), x)
        ax = x.abs()
        self.abs_sum += ax.sum(0, dtype=torch.float64)
        self.absmax = torch.maximum(self.absmax, ax.amax(0))
        self.count += x.shape[0]
        if self.sample_every:
            self.samples.append(x[:: self.sample_every].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.h.shape[0])


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.captured: list[tuple[tuple, dict]] = []

    def __getattr__(self, name: str) -> Any:  # model code may read layer attributes (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.captured.append((args, kwargs))
        raise _Stop


def layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor,
                          batch: int) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Per batch: (hidden states, other positional args, keyword args) as passed to layer 0."""
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        for i in range(0, ids.shape[0], batch):
            try:
                model(input_ids=ids[i:i + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = catcher.layer
    out = []
    for args, kwargs in catcher.captured:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        out.append((hidden, rest, kwargs))
    return out


def collect(layer: nn.Module, first: nn.Module, cached: list, sample_every: int,
            block: nn.Module | None = None, block_batches: int = 1) -> Stats:
    """Run the layer on the cached inputs up to ``first``; with ``block``, also keep that module's
    inputs for the first ``block_batches`` batches (AWQ's block-output loss)."""
    n = get_weight(first).shape[1]
    stats = Stats(n, sample_every)

    def hook(_m: nn.Module, args: tuple) -> None:
        stats.add(args[0])
        raise _Stop

    def block_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(stats.block_inputs) < block_batches:
            stats.block_inputs.append((args, kwargs))

    handles = [first.register_forward_pre_hook(hook)]
    if block is not None:
        handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
    try:
        for h, rest, kw in cached:
            try:
                layer(h, *rest, **kw)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    return stats

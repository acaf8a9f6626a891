"""Module access for the quantization driver: linear detection, weights as float ``[out, in]`` (GPT-2's
``Conv1D`` stores ``[in, out]``), untying, folding smoothing scales, the sub-layer grouping of a decoder
layer's linears and the ignore patterns.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from llmopt.errors import UserError
from llmopt.models.registry import ArchSpec, SmoothGroup
from llmopt.quant.rtn import QTensor


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a float32 ``[out, in]`` copy."""
    w = module.weight.detach()
    return (w.t() if type(module).__name__ == "Conv1D" else w).float().clone()


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Set the weight from ``[out, in]``, keeping the module's dtype and orientation."""
    p = module.weight
    new = (w.t() if type(module).__name__ == "Conv1D" else w).to(p.dtype).contiguous()
    with torch.no_grad():
        if p.shape == new.shape:
            p.copy_(new)
        else:
            raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(new.shape)}")


def untie(module: nn.Module) -> None:
    """Give ``module`` its own weight Parameter (lm_head tied to the embedding)."""
    module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)


def fold_scales(layer: nn.Module, group: SmoothGroup, s: torch.Tensor,
                qtensors: dict[str, QTensor] | None = None, prefix: str = "") -> None:
    """Fold per-channel ``s`` into a smooth group: ``prev`` output divided by s, linears' inputs × s.

    ``prev`` is a norm (weight, and bias if any, divided by s) or a linear (output rows and bias
    divided by s; if it is already quantized, its ``QTensor`` row scales are divided instead, which is
    exact). The float function of the layer is unchanged.
    """
    s = s.detach().float()
    prev = layer.get_submodule(group.prev)
    with torch.no_grad():
        if is_linear(prev):
            name = prefix + group.prev
            if qtensors is not None and name in qtensors:
                qtensors[name].scale_rows(1.0 / s)
                set_weight(prev, qtensors[name].dequantize())
            else:
                set_weight(prev, get_weight(prev) / s.unsqueeze(1))
        else:
            prev.weight.copy_((prev.weight.float() / s).to(prev.weight.dtype))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.copy_((bias.float() / s).to(bias.dtype))
        for lin in group.linears:
            m = layer.get_submodule(lin)
            set_weight(m, get_weight(m) * s.unsqueeze(0))


def sublayer_groups(spec: ArchSpec) -> list[tuple[str, ...]]:
    """The layer's linears in execution order, those sharing an input grouped together."""
    shared = {g.linears[0]: g.linears for g in spec.smooth_groups}
    members = {lin for g in spec.smooth_groups for lin in g.linears}
    groups: list[tuple[str, ...]] = []
    for lin in spec.linears:
        if lin in shared:
            groups.append(shared[lin])
        elif lin not in members:
            groups.append((lin,))
    return groups


def is_ignored(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_targets(model: nn.Module, spec: ArchSpec) -> None:
    """Every linear the spec names exists in every decoder layer."""
    layers = model.get_submodule(spec.layers_path)
    for li in range(len(layers)):
        for lin in spec.linears:
            name = f"{spec.layers_path}.{li}.{lin}"
            try:
                model.get_submodule(name)
            except AttributeError:
                raise UserError(f"{name}: not found in the model", "the checkpoint does not match its architecture spec") from None

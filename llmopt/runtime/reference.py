"""The PyTorch reference at the checkpoint's own size: weights stay in their stored dtype (bf16 stays bf16,
int4 stays packed int4) and every matmul runs in float32 on a weight upcast/dequantized just for that call.

So a bf16 7B reference holds ~13.5 GB, not the 27 GB of a float32 copy, and still computes what the float32
(or QDQ) artifact computes: the export converts bf16 → float32 exactly, and DequantizeLinear is
``(q - zero) * scale`` in float32, which is what :class:`DequantLinear` evaluates. The model is built on the
meta device and each tensor is read from the checkpoint once, straight into its place.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from llmopt.errors import UserError
from llmopt.export.trace import aliases, meta_model, real_buffers
from llmopt.models.safetensors_io import SafetensorsReader
from llmopt.models.loader import read_config
from llmopt.quant.format import is_quantized, read_scheme
from llmopt.quant.packing import unpack_int4
from llmopt.quant.smoothquant import fake_quant_activation


class _Float32(torch.nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.float()


class DequantLinear(torch.nn.Module):
    """``y = x @ ((q - zero) * scale)^T + bias`` with q kept packed; the float weight lives only during a call."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None,
                 bits: int, in_features: int, act: tuple[float, int] | None = None) -> None:
        super().__init__()
        self.qweight, self.scales, self.zeros, self.bias = qweight, scales.float(), zeros, bias
        self.bits, self.in_features, self.act = bits, in_features, act

    def weight_float(self) -> torch.Tensor:
        q = unpack_int4(self.qweight, signed=True) if self.bits == 4 else self.qweight.to(torch.int8)
        q = q.float()
        groups = self.scales.shape[1]
        g = -(-self.in_features // groups)
        s = self.scales.repeat_interleave(g, dim=1)[:, :self.in_features]
        if self.zeros is not None:
            q = q - self.zeros.float().repeat_interleave(g, dim=1)[:, :self.in_features]
        return q * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = fake_quant_activation(x, *self.act)
        return F.linear(x.float(), self.weight_float(), None if self.bias is None else self.bias.float())


def _set(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def load_reference(path: Path) -> torch.nn.Module:
    """The eval-mode model of checkpoint ``path`` (float or quantized), reading each tensor once."""
    path = Path(path)
    config, spec = read_config(path)
    tensors = SafetensorsReader.of(path)
    scheme = read_scheme(path) if is_quantized(path) else None
    model = meta_model(config, spec, torch.float32)
    qmods = (scheme or {}).get("modules", {})
    for name, info in qmods.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        act = None
        if f"{name}.input_scale" in tensors:
            act = (float(tensors.get(f"{name}.input_scale")), int(tensors.get(f"{name}.input_zero_point")))
        bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
        zeros = tensors.get(f"{name}.zeros") if f"{name}.zeros" in tensors else None
        setattr(parent, child, DequantLinear(tensors.get(f"{name}.qweight"), tensors.get(f"{name}.scales"), zeros, bias,
                                             info["bits"], info["in_features"], act))
    alias = aliases(model)
    for key, meta in list(model.state_dict(keep_vars=True).items()):
        source = next((k for k in alias.get(key, [key]) if k in tensors), None)
        if source is None:
            raise UserError(f"{path}: missing tensor {key}", "the weights do not match config.json")
        t = tensors.get(source)
        if tuple(t.shape) != tuple(meta.shape):
            raise UserError(f"{path}: tensor {source} has shape {tuple(t.shape)}, config expects {tuple(meta.shape)}")
        big = t.dim() == 2 and t.numel() >= 1 << 16
        _set(model, key, t if big or not t.is_floating_point() else t.float())
    for key, value in real_buffers(model).items():
        _set(model, key, value.float())
    if getattr(config, "tie_word_embeddings", False) and not qmods.get("lm_head"):
        model.tie_weights()
    for module in model.modules():  # matrices stay in their stored dtype and are upcast per call
        w = module._parameters.get("weight") if not isinstance(module, DequantLinear) else None
        if w is not None and w.is_floating_point() and w.dtype != torch.float32:
            parametrize.register_parametrization(module, "weight", _Float32(), unsafe=True)
    return model.eval()

"""The quantize stage's two ways through a checkpoint, both one tensor or one layer in memory.

* :func:`quantize_stream` — uncalibrated methods (RTN): no model and no data; each weight is read from the
  safetensors, quantized and written (a 7B model's peak is its largest tensor in float32 plus a few copies).
* :class:`DiskLayers` — the :class:`~llmopt.quant.calibrate.LayerStore` of the calibrated driver: a
  decoder layer's weights are read from the checkpoint (float32) just before the driver calibrates it, and
  written and dropped (back to the meta device) once it is final; the embeddings are dropped once layer 0's
  calibration inputs are captured.
"""

from __future__ import annotations

import re
import time

import torch
from torch import nn

from llmopt.models.loader import TensorSource
from llmopt.progress import Progress
from llmopt.quant.calibrate import LayerStore
from llmopt.quant.format import QuantizedWriter
from llmopt.quant.method import Method, QuantResult, one_thread
from llmopt.resources import release_free_memory

_LAYER = re.compile(r"\.(\d+)\.")


def _float_weight(t: torch.Tensor, conv1d: bool) -> torch.Tensor:
    w = t.float()
    return w.t().contiguous() if conv1d else w


def quantize_stream(source: TensorSource, names: list[str], linears: dict[str, dict], tied_head: str | None,
                    method: Method, writer: QuantizedWriter, progress: Progress, layers_path: str) -> QuantResult:
    """Quantize every linear in ``linears`` (module name → info, see :class:`QuantizedWriter`) and copy
    every other tensor in ``names``; ``tied_head`` names a quantized linear whose weight is the embedding
    (``lm_head`` of a tied model), read from ``<embedding>.weight``."""
    res = QuantResult()
    weights = {f"{m}.weight": m for m in linears}
    per_layer: dict[int, float] = {}
    tied_from = None
    if tied_head is not None:
        tied_from = next(n for n in names if n.endswith("embed_tokens.weight") or n.endswith("wte.weight"))
    with progress.task(f"{method.name} int{method.bits}: stream tensors", total=len(names)) as advance, one_thread():
        for name in names:
            t0 = time.perf_counter()
            t = source.get(name)  # an artifact `llmopt load` checked (finite values); its files match the manifest
            if name in weights:
                mod = weights[name]
                writer.write_linear(mod, method.quantize_linear(None, mod, _float_weight(t, linears[mod]["conv1d"])))
            else:
                writer.write_float(name, t)
            if name == tied_from:
                writer.write_linear(tied_head, method.quantize_linear(None, tied_head, t.float()))
                res.untied_lm_head = True
            del t
            m = _LAYER.search(name[len(layers_path):]) if name.startswith(layers_path + ".") else None
            if m is not None:
                li = int(m.group(1))
                per_layer[li] = per_layer.get(li, 0.0) + time.perf_counter() - t0
            advance(1)
    res.layer_seconds = [round(per_layer[i], 3) for i in sorted(per_layer)]
    return res


class DiskLayers(LayerStore):
    """Decoder layers brought in from ``source`` one at a time and written to ``writer`` when final."""

    def __init__(self, source: TensorSource, writer: QuantizedWriter, layers_path: str,
                 free_embeddings: bool = True) -> None:
        self.source, self.writer = source, writer
        self.free_embeddings = free_embeddings  # False: a quantized lm_head tied to them still needs them
        self.prefix = layers_path + "."
        self.by_layer: dict[int, list[str]] = {}
        for name in source.names():
            if name.startswith(self.prefix):
                self.by_layer.setdefault(int(name[len(self.prefix):].split(".", 1)[0]), []).append(name)

    def captured(self, model: nn.Module) -> None:
        """The embeddings (float32: 262 MB for a 32000 x 2048 vocabulary) served only layer 0's inputs; the
        stage copies them to the output from the checkpoint."""
        emb = model.get_input_embeddings()
        if not self.free_embeddings or emb is None or getattr(emb, "weight", None) is None:
            return
        head = model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is emb.weight:  # tied, and not quantized
            head.to("meta")
        emb.to("meta")

    def load(self, index: int, layer: nn.Module) -> None:
        start = f"{self.prefix}{index}."
        for name in self.by_layer.get(index, []):
            t = self.source.get(name)
            mod_name, _, attr = name[len(start):].rpartition(".")
            module = layer.get_submodule(mod_name) if mod_name else layer
            value = t.float().contiguous()
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value

    def done(self, index: int, layer: nn.Module, result: QuantResult) -> None:
        start = f"{self.prefix}{index}."
        for name in [n for n in result.qtensors if n.startswith(start)]:
            self.writer.write_linear(name, result.qtensors.pop(name), result.act_qparams.get(name))
        state = layer.state_dict()
        for name in self.by_layer.get(index, []):
            if name in self.writer.floats:
                self.writer.write_float(name, state[name[len(start):]])
        layer.to("meta")  # frees the layer's memory
        release_free_memory()  # and its pages, wherever in the heap they were

"""Trace a decoder's structure into ONNX without its weights.

The model is built on the ``meta`` device and given UNINITIALIZED CPU storage (``to_empty``), wrapped in
:class:`DecoderWithCache` and exported by ``torch.onnx.export(..., dynamo=True)``: torch.export traces
with fake tensors and never touches the parameters' storage, so no page of it is ever faulted in (a 1.6 GB
model traces at ~0.1 GB of RSS growth). Tracing with meta parameters also works but is ~3x slower here. The result is an onnx-ir model whose initializers
carry the parameter names (``model.<state dict key>``) and no data; :mod:`llmopt.export.bind` attaches
the data afterwards, lazily, from the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import onnx_ir as ir
import torch
import transformers

from llmopt.export.replicate import TRACED_LAYERS, replicate_layers
from llmopt.export.wrapper import DecoderWithCache, dynamic_shapes, example_inputs, io_description
from llmopt.models.registry import ArchSpec, dims_of

PREFIX = "model."  # the wrapper's attribute: traced names are "model." + the checkpoint's state-dict key


def meta_model(config: Any, spec: ArchSpec, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        model = getattr(transformers, spec.model_class)(config)
    return model.to(dtype).eval()


def real_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Values of the non-persistent buffers (rotary ``inv_freq``), which no checkpoint holds: each module
    that has them is rebuilt on the CPU from the model config (they are computed from it)."""
    out: dict[str, torch.Tensor] = {}
    for mname, module in model.named_modules():
        names = sorted(module._non_persistent_buffers_set)
        if not names:
            continue
        if not hasattr(module, "config"):
            raise RuntimeError(f"{type(module).__name__} at {mname!r} has computed buffers {names} and no config "
                               "to rebuild them from")
        real = type(module)(module.config)
        for b in names:
            out[f"{mname}.{b}" if mname else b] = getattr(real, b).detach()
    return out


def aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """state-dict key → every key naming the same parameter (tied embeddings: lm_head.weight ↔ embed)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: names for names in groups.values() for n in names}


def empty_model(config: Any, spec: ArchSpec, dtype: torch.dtype) -> torch.nn.Module:
    """The model with allocated but never-written CPU storage (virtual memory only until touched)."""
    model = meta_model(config, spec, dtype).to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own tensor; tied embeddings must stay one parameter
    return model


def trace(model: torch.nn.Module, opset: int, dtype: torch.dtype, input_names: list[str],
          output_names: list[str]) -> ir.Model:
    dims = dims_of(model.config)
    device = next(model.parameters()).device
    args = tuple(a.to(device) for a in example_inputs(dims, dtype))
    wrapper = DecoderWithCache(model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes(dims),
            input_names=input_names, output_names=output_names, verbose=False, report=False, optimize=False)
    return program.model


def _shallow(config: Any, spec: ArchSpec, n_layers: int) -> Any | None:
    """``config`` with ``n_layers`` decoder layers, or None when its layers are not all alike."""
    cfg = copy.deepcopy(config)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        if len(set(types)) > 1:
            return None
        cfg.layer_types = list(types[:n_layers])
    setattr(cfg, dict(spec.field_map).get("num_layers", "num_layers"), n_layers)
    return cfg


def trace_decoder(config: Any, spec: ArchSpec, opset: int, dtype: torch.dtype) -> tuple[ir.Model, int]:
    """The weightless graph of the whole decoder, and how many of its layers were traced: a deep model is
    traced with :data:`~llmopt.export.replicate.TRACED_LAYERS` layers and the last one copied
    (:mod:`llmopt.export.replicate`), so the cost of tracing does not grow with depth."""
    def traced(cfg: Any) -> ir.Model:
        io = io_description(dims_of(cfg), "float32", opset)
        return trace(empty_model(cfg, spec, dtype), opset, dtype, [t["name"] for t in io["inputs"]],
                     [t["name"] for t in io["outputs"]])

    n_layers = dims_of(config).num_layers
    shallow = _shallow(config, spec, TRACED_LAYERS) if n_layers > TRACED_LAYERS else None
    if shallow is not None:
        graph = traced(shallow)
        if replicate_layers(graph, n_layers, f"{PREFIX}{spec.layers_path}"):
            return graph, TRACED_LAYERS
    return traced(config), n_layers

"""The quantized checkpoint format (an HF-layout directory) and its readers.

Files:

* ``config.json`` — the source model's config (``tie_word_embeddings`` set to false when a tied
  ``lm_head`` was quantized, since it then differs from the float embedding); tokenizer files copied.
* ``model.safetensors`` — every float tensor of the model that is not a quantized weight (norms, biases,
  embeddings, ignored linears; AWQ/SmoothQuant scales are already folded into the norms/linears), in the
  model's dtype, plus for each quantized linear ``<name>`` (module name, e.g.
  ``model.layers.0.self_attn.q_proj``):

  ``<name>.qweight``   int8 ``[out, in]`` (8-bit), or uint8 ``[out, in // 2]`` (4-bit): two SIGNED
                       4-bit values per byte, two's complement, LOW nibble = even input index — the raw
                       layout of an ONNX ``INT4`` ``[out, in]`` tensor (:mod:`llmopt.quant.packing`);
  ``<name>.scales``    float32 ``[out, ceil(in / group_size)]`` (group-wise; the last group is partial
                       when the group size does not divide ``in``, as in ONNX block-wise
                       ``DequantizeLinear``; ``quantization.json`` lists them under ``partial_groups``)
                       or ``[out, 1]`` (per channel);
  ``<name>.zeros``     int8, same shape as scales, only for asymmetric schemes (values in the signed
                       range of ``bits``; NOT packed);
  ``<name>.input_scale`` / ``<name>.input_zero_point``   W8A8 only: scalar float32 / uint8 static
                       activation parameters (uint8 with zero point 128 ≡ int8 with zero point 0).

  Weights are ALWAYS in the ``[out, in]`` (``nn.Linear``) orientation, also for GPT-2's Conv1D whose
  PyTorch weight is ``[in, out]``. Dequantization is ONNX ``DequantizeLinear``'s:
  ``W[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g]``; a float ``<name>.bias`` stays as is.
  Written tensor by tensor (:class:`QuantizedWriter`), so quantizing holds one layer, not the model.
* ``quantization.json`` — the scheme (method, bits, group size, symmetry, activation scheme, quantized and
  ignored modules) plus per-linear reconstruction errors and the calibration summary.

:func:`load_dequantized` rebuilds the PyTorch model with dequantized float weights (and, for W8A8,
forward pre-hooks that fake-quantize each linear's input exactly like Q/DQ) for reference runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llmopt.errors import UserError
from llmopt.models.loader import TOKENIZER_FILES
from llmopt.models.safetensors_io import CheckpointWriter, TensorSpec
from llmopt.quant.packing import pack_int4, unpack_int4
from llmopt.quant.rtn import QTensor, group_count
from llmopt.quant.smoothquant import fake_quant_activation

FORMAT_VERSION = 1
SCHEME_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
SUFFIXES = (".qweight", ".scales", ".zeros", ".input_scale", ".input_zero_point")


def is_quantized(path: Path) -> bool:
    return (Path(path) / SCHEME_FILE).exists()


def read_scheme(path: Path) -> dict:
    try:
        return json.loads((Path(path) / SCHEME_FILE).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not a quantized checkpoint (no {SCHEME_FILE})") from None
    except ValueError as exc:
        raise UserError(f"{path}/{SCHEME_FILE}: not valid JSON ({exc})") from None


def qtensor_specs(name: str, out_f: int, in_f: int, bits: int, group_size: int | None, symmetric: bool,
                  activation: bool) -> list[TensorSpec]:
    """The tensors one quantized linear ``name`` is stored as (see the module doc)."""
    ng = group_count(in_f, group_size)
    specs = [TensorSpec(f"{name}.qweight", torch.uint8 if bits == 4 else torch.int8,
                        (out_f, in_f // 2) if bits == 4 else (out_f, in_f)),
             TensorSpec(f"{name}.scales", torch.float32, (out_f, ng))]
    if not symmetric:
        specs.append(TensorSpec(f"{name}.zeros", torch.int8, (out_f, ng)))
    if activation:
        specs += [TensorSpec(f"{name}.input_scale", torch.float32, ()),
                  TensorSpec(f"{name}.input_zero_point", torch.uint8, ())]
    return specs


class QuantizedWriter:
    """Writes the weights file of a quantized checkpoint tensor by tensor as the drivers produce them.

    ``floats``: the float tensors to store (name, dtype on disk, shape); ``linears``: quantized module name →
    ``{"out_features", "in_features", "bias", "conv1d"}``. ``modules`` (filled as linears are written) is
    the per-module table of ``quantization.json``.
    """

    def __init__(self, out_dir: Path, floats: list[TensorSpec], linears: dict[str, dict], bits: int,
                 group_size: int | None, symmetric: bool, activations: bool) -> None:
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.floats = {s.name: s for s in floats}
        self.linears = linears
        self.activations = activations
        plan = list(floats)
        for name, info in linears.items():
            plan += qtensor_specs(name, info["out_features"], info["in_features"], bits, group_size, symmetric, activations)
        self.modules: dict[str, dict] = {}
        self._w = CheckpointWriter(Path(out_dir), plan, None,
                                   metadata={"format": "pt", "llmopt_quant": str(FORMAT_VERSION)})
        self.bytes = self._w.total

    def write_float(self, name: str, tensor: torch.Tensor) -> None:
        self._w.write(name, tensor.detach().to(self.floats[name].dtype))

    def write_linear(self, name: str, qt: QTensor, act: dict | None = None) -> None:
        info = self.linears[name]
        if qt.shape != (info["out_features"], info["in_features"]) or qt.bits != self.bits:
            raise ValueError(f"{name}: planned int{self.bits} {info}, got int{qt.bits} {qt.shape}")
        self._w.write(f"{name}.qweight", pack_int4(qt.q, signed=True) if qt.bits == 4 else qt.q.to(torch.int8).contiguous())
        self._w.write(f"{name}.scales", qt.scale.float().contiguous())
        if not self.symmetric:
            self._w.write(f"{name}.zeros", qt.zero_point.to(torch.int8).contiguous())
        if self.activations:
            self._w.write(f"{name}.input_scale", torch.tensor(act["scale"], dtype=torch.float32))
            self._w.write(f"{name}.input_zero_point", torch.tensor(act["zero_point"], dtype=torch.uint8))
        self.modules[name] = {"in_features": info["in_features"], "out_features": info["out_features"],
                              "bits": qt.bits, "group_size": qt.group_size, "symmetric": qt.symmetric,
                              "bias": info["bias"], "conv1d": info["conv1d"], "activation": act is not None}
        if qt.partial_group:
            self.modules[name]["last_group"] = qt.partial_group

    def close(self) -> None:
        self._w.close()


def partial_groups(modules: dict[str, dict]) -> dict:
    """in_features → {group_size, last_group, modules} for the linears whose last group is partial."""
    out: dict[str, dict] = {}
    for info in modules.values():
        if info.get("last_group"):
            e = out.setdefault(str(info["in_features"]), {"group_size": info["group_size"],
                                                          "last_group": info["last_group"], "modules": 0})
            e["modules"] += 1
    return out


def write_scheme(out_dir: Path, writer: QuantizedWriter, result: Any, scheme: dict, config: dict,
                 source_dir: Path | None) -> dict:
    """``config.json`` (tie_word_embeddings false when a tied lm_head was quantized), tokenizer files and
    ``quantization.json``; returns the full scheme."""
    out_dir = Path(out_dir)
    cfg = dict(config)
    if result.untied_lm_head:
        cfg["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    if source_dir is not None:
        for fname in TOKENIZER_FILES:
            f = Path(source_dir) / fname
            if f.is_file():
                shutil.copy2(f, out_dir / fname)
    bits = scheme["bits"]
    full = {
        "format_version": FORMAT_VERSION,
        **scheme,
        "weight": {
            "dtype": f"int{bits}",
            "layout": "[out, in] (nn.Linear orientation, also for GPT-2 Conv1D)",
            "storage": ("uint8 [out, in/2]: two signed 4-bit values per byte, low nibble = even input index "
                        "(ONNX INT4 raw layout)") if bits == 4 else "int8 [out, in]",
            "granularity": "per output channel" if scheme.get("group_size") is None or bits == 8
                           else f"groups of {scheme['group_size']} input columns (the last one partial where "
                                "the group size does not divide the input width)",
            "zero_points": "int8 unpacked, same shape as scales" if not writer.symmetric else None,
            "dequantize": "(q - zeros) * scales, column i in group i // group_size; scales [out, ceil(in / group_size)] "
                          "or [out, 1]",
        },
        "activations": ({"dtype": "uint8", "zero_point": 128, "granularity": "per tensor, static",
                        "note": "identical to int8 with zero point 0 and the same scale"}
                       if writer.activations else None),
        "modules": writer.modules,
        "partial_groups": partial_groups(writer.modules),
        "ignored": sorted(set(result.ignored)),
        "embeddings": "float",
        "untied_lm_head": result.untied_lm_head,
        "calibration": result.calibration,
        "error_summary": result.error_summary(),
        "errors": result.errors,
        "smoothing": result.smoothing,
    }
    (out_dir / SCHEME_FILE).write_text(json.dumps(full, indent=2, default=str) + "\n")
    return full


def _linear_info(model: torch.nn.Module, name: str, qt: QTensor) -> dict:
    m = model.get_submodule(name)
    return {"out_features": qt.shape[0], "in_features": qt.shape[1], "bias": getattr(m, "bias", None) is not None,
            "conv1d": type(m).__name__ == "Conv1D"}


def save_quantized(model: torch.nn.Module, result: Any, out_dir: Path, scheme: dict,
                   source_dir: Path | None = None) -> dict:
    """Write the quantized checkpoint of an in-memory ``model`` (holding dequantized weights) to ``out_dir``.

    ``result`` is a :class:`llmopt.quant.method.QuantResult`; ``scheme`` holds at least method, bits,
    group_size, symmetric (it is extended, written to ``quantization.json`` and returned).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    qts: dict[str, QTensor] = result.qtensors
    skip = {f"{name}.weight" for name in qts}
    floats: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=False).items():
        if key in skip:
            continue
        ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if ptr in seen:  # tied weight (lm_head == embedding): stored once, re-tied on load
            continue
        seen.add(ptr)
        floats[key] = t.detach().contiguous()
    writer = QuantizedWriter(out_dir, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in floats.items()],
                             {n: _linear_info(model, n, qt) for n, qt in qts.items()}, scheme["bits"],
                             scheme.get("group_size"), scheme["symmetric"], bool(result.act_qparams))
    for k, v in floats.items():
        writer.write_float(k, v)
    for name, qt in qts.items():
        writer.write_linear(name, qt, result.act_qparams.get(name))
    writer.close()
    if source_dir is not None and (Path(source_dir) / "config.json").exists():
        cfg = json.loads((Path(source_dir) / "config.json").read_text())
    else:
        cfg = model.config.to_dict()
    return write_scheme(out_dir, writer, result, scheme, cfg, source_dir)


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    f = Path(path) / WEIGHTS_FILE
    if not f.exists():
        raise UserError(f"{path}: no {WEIGHTS_FILE}", "a quantized checkpoint is written by `llmopt quantize`")
    out = {}
    with safe_open(str(f), framework="pt") as sf:
        for k in sf.keys():
            out[k] = sf.get_tensor(k)
    return out


def qtensors_from(tensors: dict[str, torch.Tensor], scheme: dict) -> dict[str, QTensor]:
    qts = {}
    for name, info in scheme["modules"].items():
        qw = tensors[f"{name}.qweight"]
        q = unpack_int4(qw, signed=True) if info["bits"] == 4 else qw.to(torch.int8)
        if tuple(q.shape) != (info["out_features"], info["in_features"]):
            raise UserError(f"{name}.qweight has shape {tuple(q.shape)}, quantization.json says "
                            f"[{info['out_features']}, {info['in_features']}]")
        qts[name] = QTensor(q=q, scale=tensors[f"{name}.scales"].float(), zero_point=tensors.get(f"{name}.zeros"),
                            bits=info["bits"], group_size=info["group_size"], symmetric=info["symmetric"])
    return qts


def load_qtensors(path: Path) -> dict[str, QTensor]:
    """module name → :class:`QTensor` (unpacked int8 ``[out, in]``) of a quantized checkpoint."""
    return qtensors_from(_read_all(path), read_scheme(path))


def load_activation_qparams(path: Path) -> dict[str, dict]:
    """W8A8: module name → ``{"scale": float, "zero_point": int, "dtype": "uint8"}`` (empty otherwise)."""
    tensors = _read_all(path)
    out = {}
    for name in read_scheme(path)["modules"]:
        if f"{name}.input_scale" in tensors:
            out[name] = {"scale": float(tensors[f"{name}.input_scale"]),
                         "zero_point": int(tensors[f"{name}.input_zero_point"]), "dtype": "uint8"}
    return out


def load_dequantized(path: Path, activations: bool = True) -> torch.nn.Module:
    """The eval-mode float32 PyTorch model of a quantized checkpoint with dequantized weights.

    With ``activations`` (default) a W8A8 checkpoint also gets forward pre-hooks that quantize-dequantize
    each quantized linear's input with its static scale, so the model is the exact reference of the
    exported Q/DQ graph.
    """
    from llmopt.models.loader import DictSource, assign, checked_names, empty_model, expected_tensors, read_config

    path = Path(path)
    scheme = read_scheme(path)
    if scheme.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: quantized format version {scheme.get('format_version')} is not supported",
                        f"this llmopt reads version {FORMAT_VERSION}; re-run `llmopt quantize`")
    config, spec = read_config(path)
    tensors = _read_all(path)
    qts = qtensors_from(tensors, scheme)
    state = {k: v for k, v in tensors.items() if not k.endswith(SUFFIXES)}
    for name, qt in qts.items():
        w = qt.dequantize(torch.float32)
        state[f"{name}.weight"] = w.t().contiguous() if scheme["modules"][name].get("conv1d") else w
    expected, tied = expected_tensors(config, spec)
    source = DictSource(state)
    model = empty_model(config, spec)
    assign(model, source, checked_names(source, expected, tied, path), torch.float32, path)
    if activations:
        for name, info in scheme["modules"].items():
            if f"{name}.input_scale" in tensors:
                scale = float(tensors[f"{name}.input_scale"])
                zp = int(tensors[f"{name}.input_zero_point"])
                model.get_submodule(name).register_forward_pre_hook(_act_pre_hook(scale, zp))
    return model.eval()


def _act_pre_hook(scale: float, zp: int) -> Any:
    def pre(_m: torch.nn.Module, args: tuple) -> tuple:
        return (fake_quant_activation(args[0], scale, zp),) + tuple(args[1:])

    return pre

"""int8 KV cache for the GroupQueryAttention graph: calibrated per-channel scales, graph rewrite, io.json.

ONNX Runtime's CPU GroupQueryAttention stores the cache as int8 when the node has
``k_quant_type``/``v_quant_type`` = ``PER_CHANNEL`` and ``kv_cache_bit_width`` = 8: it writes
``clip(round(x / scale), -128, 127)`` for each new position and dequantizes the cache (``q * scale``)
when it attends, for the prompt as well as for decode steps. The scales are constant inputs, one per
KV channel (``kv_heads * head_dim``), so they are calibrated here, at build time, from the float graph:
the K and V the cache holds after prompts of calibration text, absmax per channel.

Keys are stored after rotary. A rotation mixes channel ``i`` with its partner (``i + rot/2``, or
``i ^ 1`` when interleaved), so the absmax of either channel depends on the position; the amplitude
``sqrt(k_i^2 + k_partner^2)`` does not. Both channels of a pair get the scale of that amplitude, which
bounds them at every position, including positions past the calibration length.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QMAX = 127.0
K_SCALE_INPUT, V_SCALE_INPUT = 12, 13  # GroupQueryAttention input slots of k_scale / v_scale


def _gqa_nodes(model: onnx.ModelProto, io: dict) -> list[onnx.NodeProto]:
    """The GroupQueryAttention node of each layer, in io.json's layer order (found by its past key)."""
    by_past = {n.input[3]: n for n in model.graph.node if n.op_type == "GroupQueryAttention"}
    return [by_past[k] for k, _ in io["past_names"]]


def _kv_names(io: dict) -> set[str]:
    return {n for pair in io["past_names"] + io["present_names"] for n in pair}


def _rotary(node: onnx.NodeProto, model: onnx.ModelProto) -> tuple[int, bool]:
    """(rotary dim, interleaved) of a GroupQueryAttention node; (0, False) without rotary."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if not attrs.get("do_rotary"):
        return 0, False
    cos = next(t for t in model.graph.initializer if t.name == node.input[7])
    return 2 * int(cos.dims[1]), bool(attrs.get("rotary_interleaved", 0))


def pair_amplitude(k: np.ndarray, rot_dim: int, interleaved: bool) -> np.ndarray:
    """Per channel of ``k [..., head_dim]``: |k|, with rotary pairs replaced by their common amplitude."""
    a = np.abs(k).astype(np.float32)
    if rot_dim:
        idx = np.arange(rot_dim)
        partner = idx ^ 1 if interleaved else (idx + rot_dim // 2) % rot_dim
        a[..., :rot_dim] = np.sqrt(k[..., idx] ** 2 + k[..., partner] ** 2)
    return a


class KvRange:
    """Running absmax per (layer, kv head, channel) of the cached K (rotation-invariant) and V."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, rotary: list[tuple[int, bool]]) -> None:
        self.k = np.zeros((layers, kv_heads, head_dim), np.float32)
        self.v = np.zeros((layers, kv_heads, head_dim), np.float32)
        self.rotary = rotary

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: [batch, kv_heads, tokens, head_dim], only positions that hold tokens."""
        rot, inter = self.rotary[layer]
        self.k[layer] = np.maximum(self.k[layer], pair_amplitude(k, rot, inter).max(axis=(0, 2)))
        self.v[layer] = np.maximum(self.v[layer], np.abs(v).max(axis=(0, 2)))

    def scales(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (k_scale, v_scale), each float32 [kv_heads * head_dim]; a channel never seen
        non-zero keeps a tiny positive scale."""
        tiny = np.float32(1e-8)
        return [(np.maximum(k / QMAX, tiny).reshape(-1).astype(np.float32),
                 np.maximum(v / QMAX, tiny).reshape(-1).astype(np.float32)) for k, v in zip(self.k, self.v)]


def calibrate(session, ids: np.ndarray, rotary: list[tuple[int, bool]], batch: int = 4,  # noqa: ANN001
              on_batch=None) -> KvRange:  # noqa: ANN001
    """Run prompts ``ids [samples, seq]`` through an OrtGqaSession of the float graph and record the
    range of what its cache holds."""
    d = session.dims
    rng = KvRange(d.num_layers, d.num_kv_heads, d.head_dim, rotary)
    seq = ids.shape[1]
    for start in range(0, ids.shape[0], batch):
        session.prefill(ids[start:start + batch])
        for layer in range(d.num_layers):
            k = session.kv_buffers[2 * layer].numpy()[:, :, :seq]
            v = session.kv_buffers[2 * layer + 1].numpy()[:, :, :seq]
            rng.update(layer, k, v)
        if on_batch is not None:
            on_batch()
    return rng


def rotary_of(model: onnx.ModelProto, io: dict) -> list[tuple[int, bool]]:
    return [_rotary(n, model) for n in _gqa_nodes(model, io)]


def quantize_kv_cache(model: onnx.ModelProto, io: dict, scales: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Make every layer's cache int8 with the given per-channel scales, in place; returns a summary."""
    nodes = _gqa_nodes(model, io)
    for layer, (node, (ks, vs)) in enumerate(zip(nodes, scales)):
        kname, vname = f"gqa.k_scale.{layer}", f"gqa.v_scale.{layer}"
        model.graph.initializer.extend([numpy_helper.from_array(ks, kname), numpy_helper.from_array(vs, vname)])
        inputs = list(node.input) + [""] * (V_SCALE_INPUT + 1 - len(node.input))
        inputs[K_SCALE_INPUT], inputs[V_SCALE_INPUT] = kname, vname
        del node.input[:]
        node.input.extend(inputs)
        keep = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
        del node.attribute[:]
        node.attribute.extend(keep + [helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                                      helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                                      helper.make_attribute("kv_cache_bit_width", 8)])
    kv = _kv_names(io)
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in kv:
            v.type.tensor_type.elem_type = TensorProto.INT8
    k_all = np.stack([k for k, _ in scales])
    v_all = np.stack([v for _, v in scales])
    return {"dtype": "int8", "scales": "per channel, calibrated absmax / 127 (rotary pairs share one)",
            "layers": len(nodes), "k_scale_range": [float(k_all.min()), float(k_all.max())],
            "v_scale_range": [float(v_all.min()), float(v_all.max())]}


def int8_io(io: dict) -> dict:
    """io.json for a graph whose cache ``quantize_kv_cache`` made int8."""
    kv = _kv_names(io)

    def retype(ts: list[dict]) -> list[dict]:
        return [{**t, "dtype": "int8"} if t["name"] in kv else t for t in ts]

    return {**io, "inputs": retype(io["inputs"]), "outputs": retype(io["outputs"]), "kv_cache_dtype": "int8"}

"""The flat-tensor decoder wrapper torch.onnx exports, and the I/O description (io.json).

The exported graph takes the KV cache as explicit inputs and returns it as outputs:

    input_ids        int64 [batch, seq]
    attention_mask   int64 [batch, total]          total = past + seq
    position_ids     int64 [batch, seq]
    past_key_values.{i}.key / .value  [batch, kv_heads, past, head_dim]
 →  logits           [batch, seq, vocab]
    present.{i}.key / .value          [batch, kv_heads, total, head_dim]
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from transformers import DynamicCache

from llmopt.models.registry import Dims, dims_of

FIXED_INPUTS = ("input_ids", "attention_mask", "position_ids")
KV_LAYOUT = "batch,kv_heads,seq,head_dim"


def past_names(n_layers: int) -> list[list[str]]:
    return [[f"past_key_values.{i}.key", f"past_key_values.{i}.value"] for i in range(n_layers)]


def present_names(n_layers: int) -> list[list[str]]:
    return [[f"present.{i}.key", f"present.{i}.value"] for i in range(n_layers)]


class DecoderWithCache(torch.nn.Module):
    """forward(ids, mask, positions, *past) -> (logits, *present), all flat tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.n_layers = dims_of(model.config).num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):  # noqa: ANN001 - traced
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)]
        cache = DynamicCache(pairs, config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        flat = []
        for layer in out.cache.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def example_inputs(dims: Dims, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    """Example inputs with past > 1 and seq > 1 so the exporter keeps those sizes symbolic."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dims.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, dims.num_kv_heads, past, dims.head_dim, generator=g).to(dtype)
          for _ in range(2 * dims.num_layers)]
    return (ids, mask, pos, *kv)


def dynamic_shapes(dims: Dims) -> dict:
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq},
            "past": tuple({0: batch, 2: past} for _ in range(2 * dims.num_layers))}


def io_description(dims: Dims, dtype: str, opset: int, quantization: dict | None = None) -> dict:
    L = dims.num_layers
    kv_shape = ["batch", dims.num_kv_heads, "past", dims.head_dim]
    out_kv_shape = ["batch", dims.num_kv_heads, "total", dims.head_dim]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
              {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    outputs = [{"name": "logits", "dtype": dtype, "shape": ["batch", "seq", dims.vocab_size]}]
    for (pk, pv), (ok, ov) in zip(past_names(L), present_names(L)):
        inputs += [{"name": pk, "dtype": dtype, "shape": kv_shape}, {"name": pv, "dtype": dtype, "shape": kv_shape}]
        outputs += [{"name": ok, "dtype": dtype, "shape": out_kv_shape},
                    {"name": ov, "dtype": dtype, "shape": out_kv_shape}]
    return {"inputs": inputs, "outputs": outputs, **asdict(dims), "dtype": dtype, "kv_dtype": dtype,
            "opset": opset, "kv_layout": KV_LAYOUT, "past_names": past_names(L), "present_names": present_names(L),
            "quantization": quantization}

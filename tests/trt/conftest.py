"""Fixtures for the TensorRT tests: an io.json like the export stage writes, an ONNX artifact directory,
a fake CUDA GPU (torch.cuda patched) and the recording fake ``tensorrt`` module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmopt.artifact import Artifact

from .fake_tensorrt import Recorder, make_module

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 32


def make_io(dtype: str = "float16", quantization: dict | None = None) -> dict:
    kv = ["batch", KV_HEADS, "past", HEAD_DIM]
    out_kv = ["batch", KV_HEADS, "total", HEAD_DIM]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
              {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    outputs = [{"name": "logits", "dtype": dtype, "shape": ["batch", "seq", VOCAB]}]
    past = [[f"past_key_values.{i}.key", f"past_key_values.{i}.value"] for i in range(LAYERS)]
    present = [[f"present.{i}.key", f"present.{i}.value"] for i in range(LAYERS)]
    for (pk, pv), (ok, ov) in zip(past, present):
        inputs += [{"name": pk, "dtype": dtype, "shape": kv}, {"name": pv, "dtype": dtype, "shape": kv}]
        outputs += [{"name": ok, "dtype": dtype, "shape": out_kv}, {"name": ov, "dtype": dtype, "shape": out_kv}]
    return {"inputs": inputs, "outputs": outputs, "num_layers": LAYERS, "num_heads": 4, "num_kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM, "hidden_size": 4 * HEAD_DIM, "vocab_size": VOCAB, "dtype": dtype,
            "kv_dtype": dtype, "opset": 23, "kv_layout": "batch,kv_heads,seq,head_dim", "past_names": past,
            "present_names": present, "quantization": quantization}


def onnx_artifact(directory: Path, io: dict) -> Artifact:
    directory.mkdir(parents=True, exist_ok=True)
    tiny_onnx(directory / "model.onnx")
    (directory / "io.json").write_text(json.dumps(io))
    return Artifact(directory, {"kind": "onnx", "stage": "export", "key": "k" * 64, "metadata": {}})


def tiny_onnx(path: Path, nodes: list | None = None, initializers: list | None = None) -> Path:
    """A valid ONNX file (the fake parser never reads it; the Q/DQ check does), weights in model.onnx.data."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")
    graph = helper.make_graph(nodes or [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
                              [w, *(initializers or [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


@pytest.fixture
def io() -> dict:
    return make_io()


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake H100")
    return "Fake H100", "9.0"


class FakeTrt:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.rec = Recorder()
        self.module = None

    def install(self, io: dict, **kwargs: object) -> Recorder:
        self.module = make_module(self.rec, io, **kwargs)
        self.monkeypatch.setitem(sys.modules, "tensorrt", self.module)
        return self.rec


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> FakeTrt:
    return FakeTrt(monkeypatch)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(d))
    return d

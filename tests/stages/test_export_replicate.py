"""A deep model is traced with three decoder layers and the rest copied (llmopt/export/replicate.py): the
graph must be the one a full trace gives (same operators, same I/O, same outputs bit for bit)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import transformers

from llmopt.models import presets


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory):
    from llmopt.cli import main

    hf = tmp_path_factory.mktemp("deep") / "hf"
    cfg = presets.preset_config("tiny-llama")
    cfg.num_hidden_layers = 5
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(presets.TINY_TRAINED / f, hf)
    out = hf.parent / "ckpt"
    assert main(["-q", "load", str(hf), "-o", str(out)]) == 0
    return out


def _run(path, feed):  # noqa: ANN001
    import onnxruntime as ort

    return ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)


def test_copied_layers_give_the_graph_of_a_full_trace(deep_ckpt, tmp_path, monkeypatch):
    import llmopt.export.trace as trace
    from llmopt.cli import main

    copied, full = tmp_path / "copied", tmp_path / "full"
    assert main(["-q", "export", str(deep_ckpt), "-o", str(copied)]) == 0
    monkeypatch.setattr(trace, "replicate_layers", lambda *a: False)  # the fallback: every layer traced
    assert main(["-q", "export", str(deep_ckpt), "-o", str(full)]) == 0
    meta = {p: json.loads((p / "manifest.json").read_text())["metadata"] for p in (copied, full)}
    assert meta[copied]["traced_layers"] == 3 and meta[full]["traced_layers"] == 5
    graphs = [onnx.load(str(p / "model.onnx"), load_external_data=False).graph for p in (copied, full)]
    assert Counter(n.op_type for n in graphs[0].node) == Counter(n.op_type for n in graphs[1].node)
    for attr in ("input", "output"):
        assert [v.name for v in getattr(graphs[0], attr)] == [v.name for v in getattr(graphs[1], attr)]
    weights = [sorted(t.name for t in g.initializer if not t.name.startswith("val_")) for g in graphs]
    assert weights[0] == weights[1] and len(graphs[0].initializer) == len(graphs[1].initializer)  # val_*: lifted constants
    io = json.loads((full / "io.json").read_text())
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 4096, (2, 3)), "attention_mask": np.ones((2, 7), np.int64),
            "position_ids": np.tile(np.arange(4, 7), (2, 1))}
    for k, v in io["past_names"]:
        for name in (k, v):
            feed[name] = rng.standard_normal((2, io["num_kv_heads"], 4, io["head_dim"])).astype(np.float32)
    for a, b in zip(_run(copied, feed), _run(full, feed)):
        np.testing.assert_array_equal(a, b)

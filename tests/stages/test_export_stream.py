"""Streaming export: bf16 sharded checkpoints, tied embeddings stored once, the tied lm_head quantizes."""

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
def tied_ckpt(tmp_path_factory, request):
    """A tiny tied-embedding Llama saved by transformers in bf16 as 3 shards with an index, then loaded."""
    from llmopt.cli import main

    hf = tmp_path_factory.mktemp("hf") / "tied"
    cfg = presets.preset_config("tiny-llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(hf, max_shard_size="200KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(presets.TINY_TRAINED / f, hf)
    assert len(list(hf.glob("*.safetensors"))) > 1 and (hf / "model.safetensors.index.json").exists()
    out = hf.parent / "ckpt"
    assert main(["-q", "load", str(hf), "-o", str(out)]) == 0
    return out


def _initializer_uses(model: onnx.ModelProto) -> dict[str, list[str]]:
    inits = {t.name for t in model.graph.initializer}
    uses: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i in inits:
                uses.setdefault(i, []).append(n.op_type)
    return uses


def test_tied_embedding_is_one_initializer_and_the_artifact_is_exact(cli, tied_ckpt, tmp_path):
    x, e, v = tmp_path / "x", tmp_path / "e", tmp_path / "v"
    r = cli("export", tied_ckpt, "-o", x, "--json")
    assert r.code == 0, r.err
    meta = r.json()["metadata"]
    assert meta["shared_initializers"] == ["model.embed_tokens.weight"]
    model = onnx.load(str(x / "model.onnx"), load_external_data=False)
    vocab_sized = [t for t in model.graph.initializer if list(t.dims) == [4096, 64]]
    assert len(vocab_sized) == 1, "the tied embedding must be stored once"
    assert sorted(_initializer_uses(model)[vocab_sized[0].name]) == ["Gather", "Transpose"]
    weights = sum(np.prod(t.dims) * 4 for t in model.graph.initializer)
    assert (x / "model.onnx.data").stat().st_size <= weights  # nothing written twice
    assert cli("build", x, "-o", e).code == 0
    r = cli("validate", e, "-o", v, "--gate", "max_logits_rel_error=1e-5", "--gate", "min_greedy_agreement=1.0", "--json")
    assert r.code == 0, r.err
    assert r.json()["report"]["metadata"]["passed"] is True


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_tied_lm_head_quantizes_and_keeps_the_float_embedding(cli, tied_ckpt, tmp_path, bits):
    x, e = tmp_path / "x", tmp_path / "e"
    assert cli("export", tied_ckpt, "-o", x).code == 0
    r = cli("build", x, "-o", e, "--quantize-lm-head", bits, "--json")
    assert r.code == 0, r.err
    info = r.json()["metadata"]["rewrite"]["lm_head"]
    assert info["tied"] is True and info["shape"] == [64, 4096]
    model = onnx.load(str(e / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] >= 1 and ops["Gather"] >= 1
    logits_node = next(n for n in model.graph.node if "logits" in n.output)
    assert logits_node.op_type == "MatMulNBits"
    r = cli("validate", e, "-o", tmp_path / "v", "--json")
    assert r.code in (0, 2), r.err
    tf = json.loads((tmp_path / "v" / "report.json").read_text())["conversion"]["teacher_forced"]
    assert tf["top1_agreement"] > (0.9 if bits == "int8" else 0.6)


def test_streamed_export_matches_pytorch_on_a_bf16_checkpoint(tied_ckpt, tmp_path):
    """The float32 export of bf16 weights computes what PyTorch computes on those weights in float32."""
    import onnxruntime as ort

    from llmopt.cli import main
    from llmopt.models.loader import load_model

    x = tmp_path / "x"
    assert main(["-q", "export", str(tied_ckpt), "-o", str(x)]) == 0
    io = json.loads((x / "io.json").read_text())
    model, _ = load_model(tied_ckpt)
    ids = np.array([[5, 9, 13, 2, 7, 3]], np.int64)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    s = ort.InferenceSession(str(x / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None]}
    for k, v in io["past_names"]:
        feed[k] = feed[v] = np.zeros((1, io["num_kv_heads"], 0, io["head_dim"]), np.float32)
    got = s.run(["logits"], feed)[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5

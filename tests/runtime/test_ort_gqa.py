"""The ORT build's GroupQueryAttention rewrite and its session: structure, exactness vs PyTorch, and a
KV cache that is bound once and written in place (never concatenated or copied between steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from llmopt.artifact import open_artifact
from llmopt.errors import UserError
from llmopt.metrics import logits_error
from llmopt.recipe import BuildConfig, Envelope
from llmopt.runner import run_stage
from llmopt.runtime.generate import first_divergence, greedy, left_pad
from llmopt.runtime.open import open_session
from llmopt.runtime.ort_session import OrtGqaSession, OrtSession
from llmopt.stages import build

PROMPT_LENGTHS = (7, 19, 32, 12)  # a left-padded batch of unequal lengths, as validate uses


def _build(onnx_dir: Path, out: Path, **cfg) -> Path:
    run_stage(build.STAGE, BuildConfig(**cfg), [open_artifact(onnx_dir)], out)
    return out


@pytest.fixture(scope="module")
def gqa_engine(tiny_onnx, tmp_path_factory) -> Path:
    return _build(tiny_onnx, tmp_path_factory.mktemp("gqa") / "engine", envelope=Envelope(input_len=(1, 32, 64), total_len=(1, 64, 96)))


@pytest.fixture(scope="module")
def std_engine(tiny_onnx, tmp_path_factory) -> Path:
    return _build(tiny_onnx, tmp_path_factory.mktemp("std") / "engine", attention="standard")


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return open_session(open_artifact(tiny_ckpt))


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, vocab, n).tolist() for n in PROMPT_LENGTHS]


def test_gqa_graph_structure(gqa_engine):
    ops = {n.op_type for n in onnx.load(str(gqa_engine / "model.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert not ops & {"Attention", "Concat", "Expand", "RotaryEmbedding"}  # no cache concat, no repeat_kv
    graph = onnx.load(str(gqa_engine / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == "" and n.input[2] == "" for n in gqa)  # q/k/v projections packed into one MatMul
    io = json.loads((gqa_engine / "io.json").read_text())
    assert io["attention"] == "gqa" and io["kv_capacity"] == 96
    names = [t["name"] for t in io["inputs"]]
    assert names[:2] == ["input_ids", "attention_mask"]  # ONNX Runtime GenAI's inputs
    assert "position_ids" not in names and "seqlens_k" not in names and "total_sequence_length" not in names
    meta = open_artifact(gqa_engine).metadata
    assert meta["attention"] == "gqa" and meta["rewrite"]["layers"] == io["num_layers"]
    assert isinstance(open_session(open_artifact(gqa_engine)), OrtGqaSession)
    assert open_session(open_artifact(gqa_engine)).io_check() == []


@pytest.mark.parametrize("engine", ["gqa_engine", "std_engine"])
def test_exact_vs_pytorch_on_left_padded_batch(engine, request, reference):
    test = open_session(open_artifact(request.getfixturevalue(engine)))
    prompts = _prompts(test.dims.vocab_size)
    ids, mask = left_pad(prompts)
    got, want = test.prefill(ids, mask), reference.prefill(ids, mask)
    assert got.shape == want.shape
    assert logits_error(want, got, mask)["max_rel"] <= 1e-4
    nxt = want[:, -1].argmax(-1)
    assert logits_error(reference.decode(nxt), test.decode(nxt))["max_rel"] <= 1e-4
    a, b = greedy(test, prompts, 32), greedy(reference, prompts, 32)
    assert first_divergence(a.tokens, b.tokens) == [None] * len(prompts)


def test_kv_buffers_bound_once_and_written_in_place(gqa_engine):
    s = open_session(open_artifact(gqa_engine))
    prompts = _prompts(s.dims.vocab_size)[:2]
    ids, mask = left_pad(prompts)
    logits = s.prefill(ids, mask)
    ptrs = [ov.data_ptr() for ov in s.kv_buffers]
    assert len(ptrs) == 2 * s.dims.num_layers and len(set(ptrs)) == len(ptrs)
    assert s.kv_buffers[0].shape() == [2, s.dims.num_kv_heads, 96, s.dims.head_dim]
    nxt = logits[:, -1].argmax(-1)
    for _ in range(5):
        nxt = s.decode(nxt)[:, -1].argmax(-1)
        # present outputs are the very buffers bound as past: GQA wrote one position in place
        outs = s.binding.get_outputs()
        assert [o.data_ptr() for o in outs[:len(ptrs)]] == ptrs
        assert [ov.data_ptr() for ov in s.kv_buffers] == ptrs
    s.prefill(ids, mask)  # a new generation with the same batch reuses the buffers
    assert [ov.data_ptr() for ov in s.kv_buffers] == ptrs
    # the cache holds each row's own tokens from position 0 (right-padded), nothing beyond
    k0 = s.kv_buffers[0].numpy()
    assert np.abs(k0[0, :, len(prompts[0]) - 1]).sum() > 0


def test_context_beyond_kv_capacity_is_a_user_error(gqa_engine):
    s = open_session(open_artifact(gqa_engine))
    with pytest.raises(UserError, match="KV capacity of 96"):
        s.prefill(np.ones((1, 97), np.int64))


def test_standard_session_still_chains_present_as_past(std_engine):
    s = open_session(open_artifact(std_engine))
    assert type(s) is OrtSession
    s.prefill(np.ones((1, 5), np.int64))
    s.decode(np.ones(1, np.int64))
    assert s._kv[0].shape()[2] == 6


def test_gqa_required_but_unsupported_is_a_user_error(tiny_onnx, tmp_path, monkeypatch):
    from llmopt import ort as ort_fusions

    def refuse(*a, **k):
        raise ort_fusions.RewriteUnsupported("no attention here")

    monkeypatch.setattr(ort_fusions, "fuse_gqa", refuse)
    with pytest.raises(UserError, match="no attention here"):
        _build(tiny_onnx, tmp_path / "e", attention="gqa")
    meta = open_artifact(_build(tiny_onnx, tmp_path / "auto")).metadata  # auto falls back, says why
    assert meta["attention"] == "standard" and meta["rewrite"]["gqa_unsupported"] == "no attention here"


def test_prefill_last_only_runs_the_lm_head_on_the_last_position(gqa_engine):
    graph = onnx.load(str(gqa_engine / "model.onnx"), load_external_data=False).graph
    window = next(n for n in graph.node if n.op_type == "Slice" and "logits_from" in n.input)
    head = next(n for n in graph.node if "logits" in n.output)
    assert head.input[0] == window.output[0]  # the lm_head reads the window, nothing else does
    default = next(t for t in graph.initializer if t.name == "logits_from")
    assert onnx.numpy_helper.to_array(default).tolist() == [0] and "logits_from" in {i.name for i in graph.input}
    s = open_session(open_artifact(gqa_engine))
    assert s.io["logits_window"] == "logits_from"
    prompts = _prompts(s.dims.vocab_size)
    one = np.asarray([prompts[1]], np.int64)
    full = s.prefill(one)
    assert full.shape == (1, len(prompts[1]), s.dims.vocab_size)  # not fed: every position, as GenAI sees it
    last = s.prefill(one, last_only=True)
    assert last.shape == (1, 1, s.dims.vocab_size) and s._logits.shape() == [1, 1, s.dims.vocab_size]
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    nxt = last[:, -1].argmax(-1)
    np.testing.assert_allclose(s.decode(nxt), (s.prefill(one), s.decode(nxt))[1], rtol=1e-5, atol=1e-5)
    ids, mask = left_pad(prompts)  # unequal rows: compacted, each row's own last token
    np.testing.assert_allclose(s.prefill(ids, mask, last_only=True), s.prefill(ids, mask)[:, -1:], rtol=1e-5, atol=1e-5)

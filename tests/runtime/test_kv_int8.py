"""int8 KV cache (build.kv_cache: int8): the kernel contract the calibrated scales rely on, the
rotation-invariant key range, the built graph and session, and the quality on the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llmopt import ort as F
from llmopt.artifact import open_artifact
from llmopt.errors import UserError
from llmopt.metrics import logits_error
from llmopt.ort.kv_cache import KvRange, pair_amplitude
from llmopt.recipe import BuildConfig, Envelope
from llmopt.runner import run_stage
from llmopt.runtime.generate import left_pad
from llmopt.runtime.open import open_session
from llmopt.stages import build

ROOT = Path(__file__).resolve().parents[2]
H, KVH, HD, CAP = 4, 2, 16, 32


def _one_gqa_model(seq: int) -> tuple[onnx.ModelProto, dict]:
    """A lone float GroupQueryAttention (no rotary) with a shared KV buffer, plus the io.json fields
    quantize_kv_cache reads."""
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tot"], ["o", "prk", "prv"],
                            domain="com.microsoft", num_heads=H, kv_num_heads=KVH)
    f = TensorProto.FLOAT
    graph = helper.make_graph([node], "g", [
        helper.make_tensor_value_info("q", f, [1, seq, H * HD]), helper.make_tensor_value_info("k", f, [1, seq, KVH * HD]),
        helper.make_tensor_value_info("v", f, [1, seq, KVH * HD]), helper.make_tensor_value_info("pk", f, [1, KVH, CAP, HD]),
        helper.make_tensor_value_info("pv", f, [1, KVH, CAP, HD]),
        helper.make_tensor_value_info("sl", TensorProto.INT32, [1]), helper.make_tensor_value_info("tot", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info(n, f, None) for n in ("o", "prk", "prv")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model, {"past_names": [["pk", "pv"]], "present_names": [["prk", "prv"]]}


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA in numpy: q [S, H, HD], k/v [KVH, S, HD] → [S, H*HD]."""
    s = q.shape[0]
    out = np.zeros((s, H, HD))
    for h in range(H):
        kv = h // (H // KVH)
        sc = q[:, h] @ k[kv].T / np.sqrt(HD) + np.triu(np.full((s, s), -np.inf), 1)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[kv]
    return out.reshape(s, H * HD)


def test_ort_int8_cache_is_round_clip_with_per_channel_scales_from_quantize_kv_cache():
    """What the calibrated scales assume of ONNX Runtime's kernel: scale index = kv_head * head_dim +
    channel, round to nearest, saturate at [-128, 127], and attention over the dequantized cache."""
    seq = 12
    model, io = _one_gqa_model(seq)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, seq, H * HD)).astype(np.float32)
    k = (rng.standard_normal((1, seq, KVH * HD)) * np.linspace(0.1, 4, KVH * HD)).astype(np.float32)
    v = rng.standard_normal((1, seq, KVH * HD)).astype(np.float32)
    kh, vh = (x.reshape(seq, KVH, HD).transpose(1, 0, 2) for x in (k, v))
    k_scale = (np.abs(kh).max(axis=1) / 127).astype(np.float32)
    v_scale = (np.abs(vh).max(axis=1) / 127 * 0.5).astype(np.float32)  # half range: V saturates
    F.quantize_kv_cache(model, io, [(k_scale.reshape(-1), v_scale.reshape(-1))])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cache = np.zeros((1, KVH, CAP, HD), np.int8)
    out, pk, pv = sess.run(None, {"q": q, "k": k, "v": v, "pk": cache, "pv": cache,
                                  "sl": np.array([seq - 1], np.int32), "tot": np.array([seq], np.int32)})
    kq = np.clip(np.round(kh / k_scale[:, None]), -128, 127)
    vq = np.clip(np.round(vh / v_scale[:, None]), -128, 127)
    assert pk.dtype == np.int8 and np.array_equal(pk[0, :, :seq], kq) and np.array_equal(pv[0, :, :seq], vq)
    assert (np.abs(vq) == 128).any() or (vq == 127).any()  # the saturation path was exercised
    want = _attention(q[0].reshape(seq, H, HD), kq * k_scale[:, None], vq * v_scale[:, None])
    np.testing.assert_allclose(out[0], want, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_key_pair_amplitude_bounds_every_rotary_position(interleaved):
    rot = 12  # partial rotary: channels 12..15 are not rotated
    rng = np.random.default_rng(1)
    k = rng.standard_normal((50, HD)).astype(np.float32)
    bound = pair_amplitude(k, rot, interleaved).max(axis=0)
    idx = np.arange(rot // 2)
    a, b = (2 * idx, 2 * idx + 1) if interleaved else (idx, idx + rot // 2)
    for theta in np.linspace(0, 2 * np.pi, 37):
        r = k.copy()
        r[:, a] = k[:, a] * np.cos(theta) - k[:, b] * np.sin(theta)
        r[:, b] = k[:, a] * np.sin(theta) + k[:, b] * np.cos(theta)
        assert (np.abs(r).max(axis=0) <= bound + 1e-6).all()
    assert np.array_equal(bound[rot:], np.abs(k[:, rot:]).max(axis=0))  # unrotated channels: plain absmax
    rng_ = KvRange(1, 1, HD, [(rot, interleaved)])
    rng_.update(0, k[None, None], k[None, None])
    ks, vs = rng_.scales()[0]
    assert np.allclose(ks * 127, bound) and np.allclose(vs * 127, np.abs(k).max(axis=0))


@pytest.fixture(scope="module")
def engines(tiny_onnx, tmp_path_factory) -> tuple[Path, Path]:
    env = Envelope(input_len=(1, 32, 64), total_len=(1, 64, 96))
    root = tmp_path_factory.mktemp("kv8")
    out = []
    for name, cache in (("float", "float"), ("int8", "int8")):
        run_stage(build.STAGE, BuildConfig(envelope=env, kv_cache=cache), [open_artifact(tiny_onnx)], root / name)
        out.append(root / name)
    return out[0], out[1]


def test_int8_engine_graph_io_and_session(engines):
    _, e8 = engines
    graph = onnx.load(str(e8 / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert all(a["k_quant_type"] == b"PER_CHANNEL" and a["kv_cache_bit_width"] == 8 for a in attrs)
    kv = [v for v in list(graph.input) + list(graph.output) if v.name.startswith(("past_key_values", "present"))]
    assert kv and all(v.type.tensor_type.elem_type == TensorProto.INT8 for v in kv)
    io = json.loads((e8 / "io.json").read_text())
    assert io["kv_cache_dtype"] == "int8" and io["kv_dtype"] == "float32"
    meta = open_artifact(e8).metadata["rewrite"]["kv_cache"]
    assert meta["dtype"] == "int8" and meta["samples"] == 16 and meta["k_scale_range"][0] > 0
    s = open_session(open_artifact(e8))
    assert s.io_check() == []
    s.prefill(np.ones((2, 5), np.int64))
    ptrs = [ov.data_ptr() for ov in s.kv_buffers]
    assert all(ov.numpy().dtype == np.int8 for ov in s.kv_buffers)
    s.decode(np.ones(2, np.int64))
    assert [ov.data_ptr() for ov in s.kv_buffers] == ptrs  # still written in place


def test_int8_cache_logits_stay_close_to_the_float_cache(engines):
    f32, i8 = (open_session(open_artifact(e)) for e in engines)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, f32.dims.vocab_size, n).tolist() for n in (7, 19, 32, 12)]
    ids, mask = left_pad(prompts)
    a, b = f32.prefill(ids, mask), i8.prefill(ids, mask)
    err = logits_error(a, b, mask)["max_rel"]
    assert 0 < err <= 0.05  # lossy, but not by much (random tiny weights; the trained model is gated below)
    nxt = a[:, -1].argmax(-1)
    assert logits_error(f32.decode(nxt), i8.decode(nxt))["max_rel"] <= 0.05


def test_kv_cache_int8_config_errors(cli, tiny_onnx, tmp_path):
    r = cli("build", tiny_onnx, "-o", tmp_path / "a", "--kv-cache", "int8", "--attention", "standard")
    assert r.code == 1 and "kv_cache int8 needs attention auto or gqa" in r.err
    r = cli("build", tiny_onnx, "-o", tmp_path / "b", "--kv-cache", "int8", "--backend", "tensorrt")
    assert r.code == 1 and "kv_cache int8 is implemented for backend onnxruntime" in r.err
    r = cli("build", tiny_onnx, "-o", tmp_path / "c", "--kv-cache", "int8", "--kv-calibration", tmp_path / "none.txt")
    assert r.code == 1 and "KV calibration text not found" in r.err
    assert not (tmp_path / "c").exists()


def test_kv_cache_int8_without_a_tokenizer_is_a_user_error(tiny_onnx, tmp_path, monkeypatch):
    import llmopt.models.loader as loader

    monkeypatch.setattr(loader, "load_tokenizer", lambda path: None)
    with pytest.raises(UserError, match="needs the checkpoint's tokenizer"):
        run_stage(build.STAGE, BuildConfig(kv_cache="int8"), [open_artifact(tiny_onnx)], tmp_path / "e")


@pytest.mark.slow
def test_int4_cpu_fast_recipe_quality_on_the_trained_model(cli, gptq_int4_workdir):
    """GPTQ int4 g128 + int8 lm_head + int8 KV cache: the recipe's gates pass on real weights, and the
    int8 cache costs (almost) nothing next to the same engine with a float cache. The work directory is
    shared with the int4-gptq recipe's test (same load/quantize/export: GPTQ runs once)."""
    w = gptq_int4_workdir
    r = cli("convert", ROOT / "recipes" / "int4-cpu-fast.yaml", "-w", w, "--json")
    assert r.code == 0, r.err
    rep = json.loads((w / "report" / "report.json").read_text())
    assert all(c["passed"] for c in rep["checks"] if c["threshold"] is not None)
    kl8 = rep["quantization"]["teacher_forced"]["kl_mean"]
    r = cli("convert", ROOT / "recipes" / "int4-cpu-fast.yaml", "-w", w, "--set", "build.kv_cache=float", "--json")
    assert r.code == 0, r.err
    kl = json.loads((w / "report" / "report.json").read_text())["quantization"]["teacher_forced"]["kl_mean"]
    assert kl8 <= kl * 1.2 + 2e-6


def test_kv_cache_int8_when_attention_falls_back_to_standard_is_a_user_error(tiny_onnx, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise F.RewriteUnsupported("no attention here")

    monkeypatch.setattr(F, "fuse_gqa", refuse)
    with pytest.raises(UserError, match="kept standard attention"):
        run_stage(build.STAGE, BuildConfig(kv_cache="int8"), [open_artifact(tiny_onnx)], tmp_path / "e")
    assert not (tmp_path / "e").exists()

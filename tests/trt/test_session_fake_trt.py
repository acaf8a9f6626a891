"""TrtSession's call sequence against the recording fake ``tensorrt``, on CPU tensors.

Established here: engine.json is checked before deserializing, the profile is switched for decode and
back, input shapes are set every step, every input gets a non-null address (even the empty past),
present buffers become the next past without a copy, logits are read back as float32. Not established:
that real TensorRT computes the right logits (that needs the GPU tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmopt.errors import UserError
from llmopt.recipe import Envelope
from llmopt.runtime.trt_session import TrtSession
from llmopt.trt.compat import engine_metadata
from llmopt.trt.gpu import GpuInfo
from llmopt.trt.profiles import derive_profiles

from .conftest import HEAD_DIM, KV_HEADS, VOCAB
from .fake_tensorrt import PLAN, VERSION

ENV = Envelope(batch=(1, 2, 4), input_len=(1, 8, 16), total_len=(1, 16, 32))
K0, P0 = "past_key_values.0.key", "present.0.key"


def engine_dir(tmp_path: Path, io: dict, gpu: GpuInfo = GpuInfo("Fake H100", "9.0"), version: str = VERSION,
               **kw: object) -> Path:
    d = tmp_path / "engine"
    d.mkdir()
    (d / "model.engine").write_bytes(PLAN)
    meta = engine_metadata(tensorrt_version=version, gpu=gpu, profiles=derive_profiles(ENV, io), io=io,
                           hardware_compat=kw.get("hw", "none"), version_compatible=kw.get("vc", False),
                           workspace_gib=4.0, engine_bytes=len(PLAN))
    (d / "engine.json").write_text(json.dumps(meta))
    return d


def shapes_set(rec, since: int = 0) -> dict:  # noqa: ANN001
    return {args[0]: args[1] for n, args in rec.calls[since:] if n == "context.set_input_shape"}


def test_prefill_then_decode(tmp_path: Path, fake_trt, fake_gpu, io: dict) -> None:  # noqa: ANN001
    rec = fake_trt.install(io)
    s = TrtSession(engine_dir(tmp_path, io), device="cpu")
    assert rec.of("runtime.deserialize_cuda_engine") == [(PLAN,)]
    assert rec.of("runtime.engine_host_code_allowed") == []
    assert s.dims.num_kv_heads == KV_HEADS and s.warnings == []

    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)
    logits = s.prefill(ids, mask)
    assert logits.dtype == np.float32 and logits.shape == (2, 5, VOCAB)
    assert np.array_equal(logits.ravel(), (np.arange(2 * 5 * VOCAB) % 251).astype(np.float16).astype(np.float32))
    assert rec.of("context.set_optimization_profile_async") == []  # profile 0 is the context's default
    first = shapes_set(rec)
    assert first["input_ids"] == (2, 5) and first["attention_mask"] == (2, 5) and first["position_ids"] == (2, 5)
    assert first[K0] == (2, KV_HEADS, 0, HEAD_DIM)
    bound = rec.of("context.execute_async_v3")[0][1]
    assert set(bound) == {t["name"] for t in io["inputs"] + io["outputs"]}
    assert all(addr != 0 for addr in bound.values())  # TensorRT needs non-null input addresses, empty past too
    present_addr = bound[P0]

    mark = len(rec.calls)
    logits = s.decode(np.array([8, 6]))
    assert logits.shape == (2, 1, VOCAB)
    assert rec.of("context.set_optimization_profile_async") == [(1, 0)]
    step = shapes_set(rec, mark)
    assert step["input_ids"] == (2, 1) and step["attention_mask"] == (2, 6) and step[K0] == (2, KV_HEADS, 5, HEAD_DIM)
    assert rec.of("context.execute_async_v3")[1][1][K0] == present_addr  # present became past, no copy

    mark = len(rec.calls)
    s.decode(np.array([1, 1]))
    assert shapes_set(rec, mark)[K0] == (2, KV_HEADS, 6, HEAD_DIM)
    assert len(rec.of("context.set_optimization_profile_async")) == 1  # still on decode

    s.prefill(ids[:1, 2:])
    assert rec.of("context.set_optimization_profile_async")[-1] == (0, 0)  # back to prefill


def test_one_token_prompt_uses_prefill_profile(tmp_path: Path, fake_trt, fake_gpu, io: dict) -> None:  # noqa: ANN001
    rec = fake_trt.install(io)
    s = TrtSession(engine_dir(tmp_path, io), device="cpu")
    s.prefill(np.array([[3]]))
    assert rec.of("context.set_optimization_profile_async") == []
    s.decode(np.array([4]))
    assert rec.of("context.set_optimization_profile_async") == [(1, 0)]


def test_outside_the_envelope_is_a_user_error(tmp_path: Path, fake_trt, fake_gpu, io: dict) -> None:  # noqa: ANN001
    rec = fake_trt.install(io)
    s = TrtSession(engine_dir(tmp_path, io), device="cpu")
    with pytest.raises(UserError, match="input 'input_ids' axis 1 is 17, the prefill profile allows 1..16"):
        s.prefill(np.ones((1, 17), np.int64))
    with pytest.raises(UserError, match="axis 0 is 5"):
        s.prefill(np.ones((5, 3), np.int64))
    assert rec.of("context.execute_async_v3") == []


def test_engine_for_another_gpu_is_refused_before_loading(tmp_path: Path, fake_trt, fake_gpu,
                                                          io: dict) -> None:  # noqa: ANN001
    rec = fake_trt.install(io)
    with pytest.raises(UserError, match="built for compute capability 8.0"):
        TrtSession(engine_dir(tmp_path, io, gpu=GpuInfo("NVIDIA A100", "8.0")), device="cpu")
    assert rec.of("runtime.deserialize_cuda_engine") == []


def test_engine_from_another_tensorrt_is_refused(tmp_path: Path, fake_trt, fake_gpu, io: dict) -> None:  # noqa: ANN001
    fake_trt.install(io)
    with pytest.raises(UserError, match="built with TensorRT 10.13.0, this machine has TensorRT 11.1.0.7"):
        TrtSession(engine_dir(tmp_path, io, version="10.13.0"), device="cpu")


def test_version_compatible_engine_allows_host_code(tmp_path: Path, fake_trt, fake_gpu, io: dict) -> None:  # noqa: ANN001
    rec = fake_trt.install(io)
    TrtSession(engine_dir(tmp_path, io, version="10.13.0", vc=True), device="cpu")
    assert rec.of("runtime.engine_host_code_allowed") == [(True,)]


def test_not_an_engine_dir(tmp_path: Path, fake_trt, fake_gpu, io: dict) -> None:  # noqa: ANN001
    fake_trt.install(io)
    with pytest.raises(UserError, match="no engine.json"):
        TrtSession(tmp_path, device="cpu")

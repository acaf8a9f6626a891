"""The build call sequence against a recording fake ``tensorrt`` (nothing is built: the plan is canned bytes).

What these tests establish: which TensorRT calls llmopt makes, in which order, with which arguments, and
what it writes. What they cannot establish: that real TensorRT accepts those calls for our ONNX graphs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmopt.errors import UserError
from llmopt.progress import SILENT
from llmopt.recipe import BuildConfig, Envelope
from llmopt.stages import build_trt
from llmopt.trt.adapter import tensorrt_status
from llmopt.trt.profiles import derive_profiles

from .conftest import HEAD_DIM, make_io, onnx_artifact
from .fake_tensorrt import PLAN, VERSION

ENV = Envelope(batch=(1, 2, 4), input_len=(1, 64, 256), total_len=(1, 256, 1024))


def config(**kw: object) -> BuildConfig:
    return BuildConfig(envelope=ENV, backend="tensorrt", device="cuda", **kw)


def build(tmp_path: Path, fake_trt, io: dict, cfg: BuildConfig | None = None, **fake: object):  # noqa: ANN001
    rec = fake_trt.install(io, **fake)
    src = onnx_artifact(tmp_path / "onnx", io)
    out = tmp_path / "out"
    out.mkdir()
    meta = build_trt.run(cfg or config(), [src], out, SILENT)
    return rec, src, out, meta


def test_call_sequence_and_files(tmp_path: Path, fake_trt, fake_gpu, cache_dir: Path, io: dict) -> None:  # noqa: ANN001
    rec, src, out, meta = build(tmp_path, fake_trt, io)
    mod = fake_trt.module
    # the parser gets the file path (external data resolves beside it), never bytes
    assert rec.of("parser.parse_from_file") == [(str(src.file("model.onnx").resolve()),)]
    assert (Path(rec.of("parser.parse_from_file")[0][0]).parent / "model.onnx.data").exists()
    assert rec.of("builder.create_network") == [(1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED),)]
    assert rec.of("config.set_memory_pool_limit") == [(mod.MemoryPoolType.WORKSPACE, 4 * (1 << 30))]
    # one set_shape per dynamic input per profile, with the derived min/opt/max, profiles added in order
    expected = derive_profiles(ENV, io)
    sets = rec.of("profile.set_shape")
    assert len(sets) == 2 * len(io["inputs"])
    added = [args[0] for args in rec.of("config.add_optimization_profile")]
    assert len(added) == 2
    for index, profile in enumerate(expected):
        mine = [s[1:] for s in sets if s[0] is added[index]]
        assert mine == [(name, r.min, r.opt, r.max) for name, r in profile.shapes.items()]
    # no precision flags: there are none to set in TensorRT 11; nothing else was set by default
    assert rec.of("config.set_flag") == []
    assert rec.of("config.hardware_compatibility_level") == []
    names = rec.names()
    assert names.index("config.set_timing_cache") < names.index("builder.build_serialized_network") \
        < names.index("config.get_timing_cache")
    assert len(rec.of("builder.build_serialized_network")) == 1
    # files: the canned plan verbatim, engine.json, build.log with TensorRT's own log lines
    assert (out / "model.engine").read_bytes() == PLAN
    ej = json.loads((out / "engine.json").read_text())
    assert ej["tensorrt_version"] == VERSION
    assert ej["gpu"] == {"name": "Fake H100", "compute_capability": "9.0"}
    assert ej["precision"]["mode"] == "fp16"
    assert ej["profiles"] == [p.to_json() for p in expected]
    assert ej["io"] == io and ej["engine_bytes"] == len(PLAN)
    assert "[INFO] fake builder: nothing was built" in (out / "build.log").read_text()
    assert meta["backend"] == "tensorrt" and meta["precision"] == "fp16" and meta["engine_bytes"] == len(PLAN)


def test_timing_cache_loaded_and_saved(tmp_path: Path, fake_trt, fake_gpu, io: dict) -> None:  # noqa: ANN001
    cache = tmp_path / "shared" / "trt.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"earlier-build")
    rec, _, _, meta = build(tmp_path, fake_trt, io, config(timing_cache=cache))
    assert rec.of("config.create_timing_cache")[0] == (b"earlier-build",)
    assert rec.of("config.set_timing_cache") == [(b"earlier-build", False)]
    assert cache.read_bytes() == b"earlier-build+timed"  # what the builder's cache serialized after the build
    assert (tmp_path / "shared" / "trt.cache.lock").exists()
    assert meta["timing_cache"] == {"path": str(cache), "reused": True, "loaded_bytes": 13,
                                    "saved_bytes": len(b"earlier-build+timed")}


def test_timing_cache_default_path_starts_empty(tmp_path: Path, fake_trt, fake_gpu, cache_dir: Path,
                                               io: dict) -> None:  # noqa: ANN001
    rec, _, _, meta = build(tmp_path, fake_trt, io)
    assert rec.of("config.create_timing_cache")[0] == (b"",)
    path = Path(meta["timing_cache"]["path"])
    assert path.parent == cache_dir / "tensorrt" and f"trt{VERSION}-sm90" in path.name
    assert path.read_bytes() == b"+timed"


def test_cache_from_another_device_is_replaced(tmp_path: Path, fake_trt, fake_gpu, io: dict) -> None:  # noqa: ANN001
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"other-gpu")
    rec, _, out, meta = build(tmp_path, fake_trt, io, config(timing_cache=cache), cache_matches=False)
    assert rec.of("config.set_timing_cache") == [(b"other-gpu", False), (b"", False)]
    assert meta["timing_cache"]["reused"] is False
    assert "another device" in (out / "build.log").read_text()


def test_compat_flags(tmp_path: Path, fake_trt, fake_gpu, cache_dir: Path, io: dict) -> None:  # noqa: ANN001
    rec, _, out, _ = build(tmp_path, fake_trt, io, config(hardware_compat="ampere+", version_compatible=True,
                                                          workspace_gib=1.5))
    mod = fake_trt.module
    assert rec.of("config.set_flag") == [(mod.BuilderFlag.VERSION_COMPATIBLE,)]
    assert rec.of("config.hardware_compatibility_level") == [(mod.HardwareCompatibilityLevel.AMPERE_PLUS,)]
    assert rec.of("config.set_memory_pool_limit")[0][1] == int(1.5 * (1 << 30))
    ej = json.loads((out / "engine.json").read_text())
    assert ej["hardware_compat"] == "ampere+" and ej["version_compatible"] is True


def test_quantized_precision_recorded(tmp_path: Path, fake_trt, fake_gpu, cache_dir: Path) -> None:  # noqa: ANN001
    io = make_io("float16", {"method": "awq", "bits": 4, "group_size": 128})
    _, _, out, meta = build(tmp_path, fake_trt, io)
    assert meta["precision"] == "int4 weight-only (awq)"
    assert json.loads((out / "engine.json").read_text())["precision"]["quantization"]["method"] == "awq"


def test_network_disagreeing_with_profiles_stops_before_build(tmp_path: Path, fake_trt, fake_gpu, cache_dir: Path,
                                                              io: dict) -> None:  # noqa: ANN001
    net = [{"name": t["name"], "shape": [d if isinstance(d, int) else -1 for d in t["shape"]]} for t in io["inputs"]]
    net[3]["shape"][3] = HEAD_DIM * 2
    with pytest.raises(UserError, match="past_key_values.0.key' axis 3 is fixed"):
        build(tmp_path, fake_trt, io, network_inputs=net)
    assert fake_trt.rec.of("builder.build_serialized_network") == []


def test_parser_and_builder_failures_are_one_line(tmp_path: Path, fake_trt, fake_gpu, cache_dir: Path,
                                                  io: dict) -> None:  # noqa: ANN001
    with pytest.raises(UserError, match="ONNX parser failed \\(2 errors\\), first: fake parser error 0"):
        build(tmp_path / "a", fake_trt, io, parse_ok=False)
    with pytest.raises(UserError, match="could not build the engine: fake builder: out of workspace"):
        build(tmp_path / "b", fake_trt, io, build_ok=False)


def test_without_tensorrt_the_hint_says_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu,
                                                io: dict) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError) as exc:
        build_trt.run(config(), [onnx_artifact(tmp_path / "onnx", io)], out, SILENT)
    assert "TensorRT is not installed" in str(exc.value) and "llmopt[gpu]" in str(exc.value)


def test_without_gpu_the_hint_says_install(tmp_path: Path, fake_trt, monkeypatch: pytest.MonkeyPatch,
                                           io: dict) -> None:  # noqa: ANN001
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        build(tmp_path, fake_trt, io)


def test_device_default_does_not_block_tensorrt(tmp_path: Path, fake_trt, fake_gpu, cache_dir: Path,
                                                io: dict) -> None:  # noqa: ANN001
    # `llmopt build ONNX -o DIR --backend tensorrt` passes the CLI's default --device cpu
    cfg = BuildConfig(envelope=ENV, backend="tensorrt", device="cpu")
    _, _, out, meta = build(tmp_path, fake_trt, io, cfg)
    assert meta["device"] == "cuda" and (out / "model.engine").read_bytes() == PLAN


def test_status_for_doctor(fake_trt, fake_gpu, io: dict, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    fake_trt.install(io)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    assert tensorrt_status() == {"importable": True, "version": VERSION, "cuda_available": True,
                                 "gpu_name": "Fake H100", "compute_capability": "9.0", "error": None}


def test_status_without_tensorrt() -> None:
    status = tensorrt_status()  # this machine: no tensorrt, no GPU
    if status["importable"]:
        pytest.skip("tensorrt is installed here")
    assert status["importable"] is False and status["version"] is None and "llmopt[gpu]" in status["error"]


def test_tensorrt_is_never_imported_at_module_import() -> None:
    code = ("import sys, llmopt.trt.adapter, llmopt.stages.build_trt, llmopt.runtime.trt_session, "
            "llmopt.trt.profiles, llmopt.trt.compat; print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_engine_is_self_contained_and_runs_the_shared_loop(tmp_path: Path, fake_trt, fake_gpu, cache_dir: Path,
                                                          io: dict) -> None:  # noqa: ANN001
    """The build dispatcher copies the tokenizer / generation config into the TensorRT engine too, and the
    engine directory alone feeds `generate`'s loop (fake TensorRT: canned logits, real tokenizer)."""
    import shutil

    from llmopt.artifact import Artifact
    from llmopt.models import presets
    from llmopt.runtime import assets
    from llmopt.runtime.generate import complete
    from llmopt.runtime.trt_session import TrtSession
    from llmopt.stages import build

    fake_trt.install(io)
    src = onnx_artifact(tmp_path / "onnx", io)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy2(presets.TINY_TRAINED / name, src.path / name)
    out = tmp_path / "engine"
    out.mkdir()
    meta = build.run(config(), [src], out, SILENT)
    assert meta["assets"]["tokenizer"] and {"tokenizer.json", "generation_config.json", "io.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "io.json").read_text()) == io
    shutil.rmtree(src.path)  # nothing outside the engine directory is needed from here on
    found = assets.find(Artifact(out, {"kind": "engine", "stage": "build", "key": "e" * 64, "inputs": []}))
    assert found.inside and found.eos_ids == [0]
    session = TrtSession(out, device="cpu")
    ids = [t % io["vocab_size"] for t in found.prompt("hello")]
    c = complete(session, found.tokenizer, [ids], 4, eos_ids=found.eos_ids).completions[0]
    assert len(c.token_ids) == 4 or c.finish_reason == "stop"

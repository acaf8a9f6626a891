import json
from pathlib import Path

import pytest

from llmopt.artifact import (MANIFEST, Artifact, cache_key, commit, new_manifest, open_artifact, read_manifest,
                             staging_dir, sweep_stale, write_manifest)
from llmopt.errors import UserError


def _make(directory: Path, key: str = "k1") -> dict:
    (directory / "a.bin").write_bytes(b"abc")
    m = new_manifest(stage="load", kind="checkpoint", key=key, inputs=[], config={"x": 1}, metadata={},
                     directory=directory, started=0.0, finished=1.0)
    write_manifest(directory, m)
    return m


def test_cache_key_changes_with_config_and_inputs():
    base = cache_key("export", 1, {"opset": 23}, ["a"], ["onnx"])
    assert base == cache_key("export", 1, {"opset": 23}, ["a"], ["onnx"])
    assert base != cache_key("export", 1, {"opset": 21}, ["a"], ["onnx"])
    assert base != cache_key("export", 1, {"opset": 23}, ["b"], ["onnx"])
    assert base != cache_key("export", 2, {"opset": 23}, ["a"], ["onnx"])


def test_manifest_lists_files_and_is_valid(tmp_path):
    m = _make(tmp_path)
    assert m["files"] == {"a.bin": {"sha256": m["files"]["a.bin"]["sha256"], "bytes": 3}}
    assert read_manifest(tmp_path)["key"] == "k1"
    for field in ("schema_version", "llmopt_version", "environment", "created_at", "duration_s", "inputs"):
        assert field in m


def test_truncated_file_invalidates_manifest(tmp_path):
    _make(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"ab")
    assert read_manifest(tmp_path) is None
    with pytest.raises(UserError, match=r"a\.bin: size 2 bytes, manifest says 3"):
        open_artifact(tmp_path)


def test_open_catches_same_size_corruption(tmp_path):
    _make(tmp_path)
    open_artifact(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"xyz")
    assert read_manifest(tmp_path) is not None  # sizes match: only the hash tells
    with pytest.raises(UserError, match=r"a\.bin: sha256 differs from the manifest"):
        open_artifact(tmp_path)


def test_directory_without_manifest_is_not_an_artifact(tmp_path):
    (tmp_path / "x").write_text("1")
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST).write_text("{not json")
    assert read_manifest(tmp_path) is None


def test_staging_is_removed_on_failure_and_target_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(RuntimeError):
        with staging_dir(out) as tmp:
            (tmp / "half").write_text("partial")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep").read_text() == "old"


def test_commit_replaces_existing_directory_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with staging_dir(out) as tmp:
        _make(tmp, "k2")
        commit(tmp, out)
    assert not (out / "old").exists()
    assert read_manifest(out)["key"] == "k2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sweep_removes_leftovers_of_killed_runs(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out.partial-dead").mkdir()
    (tmp_path / "out.trash-dead").mkdir()
    (tmp_path / "other.partial-x").mkdir()
    sweep_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.partial-x"]


def test_open_artifact_checks_kind(tmp_path):
    _make(tmp_path)
    assert isinstance(open_artifact(tmp_path, ("checkpoint",)), Artifact)
    with pytest.raises(UserError, match="expected onnx"):
        open_artifact(tmp_path, ("onnx",))
    json.loads((tmp_path / MANIFEST).read_text())


def test_an_interrupt_a_library_swallowed_still_stops_the_stage_before_commit(tmp_path):
    """SIGINT's Interrupted raised where a library catches everything (a bare except, an exporter's
    fallback) must not let the stage publish its output: the runner checks before committing."""
    from pydantic import BaseModel

    from llmopt import errors
    from llmopt.runner import run_stage
    from llmopt.stages.base import Stage

    class Cfg(BaseModel):
        x: int = 1

    def run(config, inputs, out, progress):  # noqa: ANN001, ANN202, ARG001
        (out / "weights.bin").write_bytes(b"x" * 16)
        try:
            errors.interrupt(2)  # what the SIGINT handler does
        except BaseException:  # noqa: BLE001, S110 - the library that swallows it
            pass
        return {}

    stage = Stage(name="swallow", kind="checkpoint", version=1, config_model=Cfg, run=run, packages=())
    try:
        with pytest.raises(errors.Interrupted):
            run_stage(stage, Cfg(), [], tmp_path / "out")
    finally:
        errors.clear_interrupt()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging left

"""Every read of an artifact checks its files against the manifest (size, sha256, nothing extra)."""

import os
import shutil
from pathlib import Path

import pytest

from llmopt import integrity
from llmopt.artifact import new_manifest, open_artifact, write_manifest
from llmopt.errors import UserError
from llmopt.integrity import VERIFIED, check_files
from llmopt.staging import commit, staging_dir


def _commit(out: Path, payload: bytes = b"weights" * 100) -> Path:
    with staging_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "io.json").write_text("{}")
        m = new_manifest(stage="load", kind="checkpoint", key="k", inputs=[], config={}, metadata={},
                         directory=tmp, started=0.0, finished=0.0)
        write_manifest(tmp, m)
        commit(tmp, out)
    return out


def _count_hashes(monkeypatch) -> list:
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    return calls


def test_commit_seeds_the_hash_cache_so_reads_do_not_rehash(tmp_path, monkeypatch):
    out = _commit(tmp_path / "a")
    assert (out / VERIFIED).exists()
    calls = _count_hashes(monkeypatch)
    open_artifact(out)
    assert calls == []  # fingerprints recorded at commit still match after the directory rename


def test_same_size_corruption_with_mtime_restored_is_caught(tmp_path):
    out = _commit(tmp_path / "a")
    open_artifact(out)
    st = os.stat(out / "w.bin")
    with open(out / "w.bin", "r+b") as f:
        f.write(b"X")
    os.utime(out / "w.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the write from mtime
    with pytest.raises(UserError, match=r"w\.bin: sha256 differs from the manifest"):
        open_artifact(out)


def test_copy_is_rehashed_and_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "RACY_NS", 0)  # the copy is seconds old in real use
    out = _commit(tmp_path / "a")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    calls = _count_hashes(monkeypatch)
    open_artifact(copy)
    assert sorted(calls) == ["io.json", "w.bin"]  # new inodes: the copied cache cannot vouch for them
    calls.clear()
    open_artifact(copy)
    assert calls == []


def test_extra_missing_and_symlinked_files_are_problems(tmp_path):
    out = _commit(tmp_path / "a")
    (out / "planted.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match=r"planted\.onnx: not in the manifest's file table"):
        open_artifact(out)
    (out / "planted.onnx").unlink()
    (out / "sub" / "io.json").unlink()
    with pytest.raises(UserError, match=r"sub/io\.json: missing"):
        open_artifact(out)
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", out / "sub" / "io.json")
    with pytest.raises(UserError, match="not a regular file"):
        open_artifact(out)


def test_names_in_the_file_table_cannot_escape(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "secret").write_text("s")
    problems = check_files(tmp_path / "d", {"../secret": {"bytes": 1, "sha256": "0"}})
    assert problems[0].what.startswith("bad name")


def test_read_only_artifact_is_verified_without_a_cache(tmp_path, monkeypatch):
    out = _commit(tmp_path / "a")
    (out / VERIFIED).unlink()
    monkeypatch.setattr(integrity, "write_cache", lambda d, e: None)
    calls = _count_hashes(monkeypatch)
    open_artifact(out)
    open_artifact(out)
    assert calls.count("w.bin") == 2


def test_a_just_changed_file_is_hashed_but_not_cached(tmp_path, monkeypatch):
    out = _commit(tmp_path / "a")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # ctimes: now
    calls = _count_hashes(monkeypatch)
    open_artifact(copy)
    open_artifact(copy)
    assert calls.count("w.bin") == 2  # a second write in the same timestamp tick could hide from the ctime

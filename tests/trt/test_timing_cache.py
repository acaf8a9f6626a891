"""The shared timing-cache file: locking and merge-on-write (no TensorRT involved)."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from llmopt.trt import timing_cache


def test_read_missing_is_empty(tmp_path: Path) -> None:
    assert timing_cache.read(tmp_path / "c" / "t.cache") == b""


def test_update_merges_what_is_on_disk_now(tmp_path: Path) -> None:
    path = tmp_path / "t.cache"
    path.write_bytes(b"written-by-a-concurrent-build")
    seen = []
    size = timing_cache.update(path, lambda current: seen.append(current) or current + b"+mine")
    assert seen == [b"written-by-a-concurrent-build"]
    assert path.read_bytes() == b"written-by-a-concurrent-build+mine" and size == len(path.read_bytes())
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*.tmp"))


def test_writer_holds_an_exclusive_lock(tmp_path: Path) -> None:
    path = tmp_path / "t.cache"

    def merge(current: bytes) -> bytes:
        with open(path.with_name(path.name + ".lock"), "a+b") as other:  # another open file = another builder
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        return b"x"

    timing_cache.update(path, merge)
    with open(path.with_name(path.name + ".lock"), "a+b") as other:  # released afterwards
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_failed_merge_leaves_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "t.cache"
    path.write_bytes(b"keep")

    def boom(current: bytes) -> bytes:
        raise RuntimeError("merge failed")

    with pytest.raises(RuntimeError):
        timing_cache.update(path, boom)
    assert path.read_bytes() == b"keep"


def test_default_path_per_version_and_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    assert timing_cache.default_path("10.13.0.35", "8.6") == tmp_path / "tensorrt" / "timing-trt10.13.0.35-sm86.cache"

"""A TensorRT timing cache file shared by concurrent builds: read under a shared lock, written under an
exclusive lock by merging into what is on disk now, replaced atomically (a reader never sees half a file).

The lock is ``fcntl.flock`` on ``<cache>.lock`` beside the cache (POSIX; TensorRT is Linux/Windows only and
llmopt's TensorRT branch targets Linux).
"""

from __future__ import annotations

import fcntl
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def default_path(tensorrt_version: str, compute_capability: str) -> Path:
    """One cache per TensorRT version and GPU kind under $LLMOPT_CACHE_DIR or $XDG_CACHE_HOME/llmopt."""
    root = os.environ.get("LLMOPT_CACHE_DIR")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmopt"
    sm = compute_capability.replace(".", "")
    return base / "tensorrt" / f"timing-trt{tensorrt_version}-sm{sm}.cache"


@contextmanager
def locked(path: Path, exclusive: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def read(path: Path) -> bytes:
    """The cache's bytes, b'' when there is none yet."""
    with locked(path, exclusive=False):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return b""


def update(path: Path, merge: Callable[[bytes], bytes]) -> int:
    """Write ``merge(current bytes on disk)`` atomically while holding the exclusive lock; returns its size."""
    with locked(path, exclusive=True):
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            current = b""
        data = merge(current)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return len(data)

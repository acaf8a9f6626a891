"""Preflight and measurement of a stage's memory, disk and time.

Before a stage runs, its estimator (``Stage.estimate``, in :mod:`llmopt.estimates`) predicts the peak RSS of
the process, the bytes it writes and roughly how long it takes, from the config and the tensor shapes (file
headers only). The stage is refused with one line when the prediction does not fit in the memory
available now or the free disk (``--force`` overrides). While it runs, a sampler thread records the
process's peak RSS; the manifest keeps estimate and measurement side by side (``metadata.resources``) so
the estimators can be checked against real runs.
"""

from __future__ import annotations

import functools

import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import psutil

from llmopt.errors import UserError

GB = 1e9
SAMPLE_S = 0.05


@dataclass(frozen=True)
class Estimate:
    peak_rss_bytes: int           # of the whole process, baseline included
    disk_bytes: int               # written into the output directory
    seconds: float                # rough, for this machine class
    basis: dict = field(default_factory=dict)  # the sizes it was computed from

    def to_json(self) -> dict:
        return {**asdict(self), "peak_rss_gb": round(self.peak_rss_bytes / GB, 3), "disk_gb": round(self.disk_bytes / GB, 3)}


def rss() -> int:
    return psutil.Process().memory_info().rss


def _free_disk(out: Path) -> int:
    p = Path(out).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check(stage: str, estimate: Estimate | None, out: Path, force: bool) -> None:
    """Refuse (one line, exit 1) when the estimate does not fit; ``force`` runs anyway."""
    if estimate is None or force:
        return
    available = psutil.virtual_memory().available + rss()  # this process's own pages count towards its peak
    if estimate.peak_rss_bytes > available:
        raise UserError(f"{stage}: needs about {estimate.peak_rss_bytes / GB:.1f} GB of memory (estimated peak RSS), "
                        f"{available / GB:.1f} GB available", "free memory, use a smaller dtype, or pass --force to try anyway")
    free = _free_disk(out)
    if estimate.disk_bytes > free:
        raise UserError(f"{stage}: writes about {estimate.disk_bytes / GB:.1f} GB, {free / GB:.1f} GB free at {out}",
                        "free disk space or choose another output directory (--force to try anyway)")


class Usage:
    """Peak RSS of this process while the stage runs, sampled every 50 ms (plus ru_maxrss-free start/end)."""

    def __init__(self, estimate: Estimate | None) -> None:
        self.estimate = estimate
        self.start_rss = rss()
        self.peak = self.start_rss
        self.started = time.perf_counter()
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, proc.memory_info().rss)

    def record(self, directory: Path) -> dict:
        disk = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
        measured = {"peak_rss_bytes": self.peak, "start_rss_bytes": self.start_rss, "disk_bytes": disk,
                    "seconds": round(self.seconds, 2), "peak_rss_gb": round(self.peak / GB, 3)}
        out: dict = {"measured": measured}
        if self.estimate is not None:
            out["estimate"] = self.estimate.to_json()
            out["peak_rss_ratio"] = round(self.peak / max(1, self.estimate.peak_rss_bytes), 3)
        return out


@contextmanager
def measure(estimate: Estimate | None) -> Iterator[Usage]:
    usage = Usage(estimate)
    usage._thread.start()
    try:
        yield usage
    finally:
        usage._stop.set()
        usage._thread.join()
        usage.peak = max(usage.peak, rss())
        usage.seconds = time.perf_counter() - usage.started


MMAP_THRESHOLD = 1 << 20  # bytes: allocations at least this big get their own mapping, unmapped on free


@functools.cache
def _glibc():  # noqa: ANN202 - ctypes.CDLL | None
    """The C library when it is glibc (``mallopt``, ``malloc_trim``), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory_promptly() -> bool:
    """Make glibc give large freed blocks back to the system at once (``mallopt(M_MMAP_THRESHOLD)``).

    By default glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MB),
    so after the first big tensor is freed, later ones of that size come from the heap and stay resident
    after ``del`` whenever a small allocation sits above them. A layer-by-layer stage (GPTQ's Hessians, the
    calibration forward's intermediates) then holds the high-water mark of every layer it saw: SmolLM2 GPTQ
    peaked at 1.04 GB by default and 0.75 GB with the threshold fixed at 1 MB (same run time within 5 %).
    Returns False where there is no glibc (the call is then a no-op).
    """
    libc = _glibc()
    return bool(libc and libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD; setting it disables the dynamic rule


def release_free_memory() -> bool:
    """glibc's ``malloc_trim(0)``: hand the free pages inside the heap back to the system.

    A large block is only mapped on its own when the heap has no free room for it: once the heap has grown
    (a transient burst of small blocks, or big ones allocated before the mmap threshold was fixed, such as
    the meta-device model accelerate builds via CPU tensors), later big tensors are carved from its holes,
    and freed holes stay resident. The 1.1B GPTQ through the CLI grew its heap to 0.8 GB that way and
    peaked at 1.41 GiB; trimmed once per layer it keeps one layer's working set. Returns False without glibc.
    """
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))

"""Staging directories: build beside the target, move into place whole, sweep only what nobody owns.

A run builds into ``<out>.partial-<random>`` and holds an exclusive ``flock`` on that directory until
it is committed or removed. The kernel drops the lock when the process dies (kill -9 included), so a
staging directory whose lock can be taken is a leftover of a dead run and is swept; one that is locked
belongs to a live run (another ``llmopt`` writing beside it) and is left alone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from llmopt.errors import UserError

PARTIAL_TAG = ".partial-"
TRASH_TAG = ".trash-"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on directory ``path``, or None if another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep_stale(out: Path) -> None:
    """Remove leftovers of dead runs beside ``out`` (partial builds, trash); live runs' are kept."""
    parent = out.parent
    if not parent.exists():
        return
    for tag in (PARTIAL_TAG, TRASH_TAG):
        for stale in parent.glob(f"{out.name}{tag}*"):
            fd = _try_lock(stale)
            if fd is None:
                continue
            try:
                if os.stat(stale).st_ino == os.fstat(fd).st_ino:  # still the directory we locked
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
            finally:
                os.close(fd)


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh, locked sibling directory to build into; removed if the body raises (Ctrl-C included)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f"{out.name}{PARTIAL_TAG}{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"{out.parent}: cannot create the output there ({exc.strerror})",
                        "choose an output directory in a writable location") from None
    fd = _try_lock(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def commit(staging: Path, out: Path, on_swap: Callable[[], None] = lambda: None) -> None:
    """Move a finished staging directory into place, replacing ``out`` (an llmopt artifact) if it exists."""
    trash = None
    if out.exists():
        trash = out.parent / f"{out.name}{TRASH_TAG}{secrets.token_hex(4)}"
        os.replace(out, trash)
        on_swap()
    try:
        os.replace(staging, out)
    except OSError as exc:
        if trash is not None and not out.exists():
            os.replace(trash, out)  # put the previous artifact back
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise UserError(f"{out}: another llmopt run wrote this output at the same time",
                            "run one command per output directory, then rerun") from None
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)

"""Exceptions that carry a user-facing message instead of a traceback."""

from __future__ import annotations

import errno
import os

BUG_EXIT = 70          # EX_SOFTWARE: a bug (with its traceback), never 1, so CI can tell the two apart
INTERRUPTED_EXIT = 130  # Ctrl-C / SIGINT

# the environment, not llmopt: disk full, quota, read-only or forbidden locations
_ENV_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}


class UserError(Exception):
    """Bad input, a missing file or a missing optional dependency: exit 1, one line, no traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class Interrupted(BaseException):
    """SIGINT / SIGTERM. A BaseException of llmopt's own, so no library (Typer turns KeyboardInterrupt into a
    silent Exit(130)) swallows it; staging directories are removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


_pending: int | None = None  # the signal received, kept even if a library swallows its Interrupted


def interrupt(signum: int) -> None:
    """The SIGINT/SIGTERM handler's body: remember the signal, then raise."""
    global _pending
    _pending = signum
    raise Interrupted(signum)


def clear_interrupt() -> None:
    global _pending
    _pending = None


def raise_if_interrupted() -> None:
    """Before anything is committed: a signal whose Interrupted was raised where a library catches everything
    (a bare ``except``, a finalizer, an exporter's fallback) must still stop the run."""
    if _pending is not None:
        raise Interrupted(_pending)


class GateFailed(Exception):
    """A validation gate failed: exit 2."""

    exit_code = 2

    def __init__(self, failed: list[str], report: dict | None = None) -> None:
        super().__init__("validation gates failed: " + ", ".join(failed))
        self.failed = failed
        self.report = report


def environment_error(exc: BaseException) -> UserError | None:
    """A UserError for failures caused by the machine rather than by llmopt (disk full, permissions, memory).

    Libraries that write files (torch, safetensors, onnx) often re-raise ENOSPC as a RuntimeError with the
    OS message in it; those are recognized by the message.
    """
    if isinstance(exc, MemoryError):
        return UserError("out of memory", "use a machine with more RAM or a smaller model / envelope")
    if isinstance(exc, OSError) and exc.errno in _ENV_ERRNOS:
        where = f" ({exc.filename})" if exc.filename else ""
        return UserError(f"{_ENV_ERRNOS[exc.errno]}{where}", _hint(exc.errno))
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in text:
            return UserError(_ENV_ERRNOS[code] + f" ({type(exc).__name__})", _hint(code))
    return None


def _hint(code: int) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space (or write the output elsewhere) and rerun; nothing partial was kept"
    return "choose an output location you can write to, or fix the permissions"

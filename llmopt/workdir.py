"""The convert work directory: created by llmopt (marker file), one convert at a time (flock)."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmopt import __version__
from llmopt.errors import UserError

MARKER = ".llmopt-workdir"


def _claim(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"{workdir}: exists and is a file, not a work directory", "pass -w DIR for a directory")
    if (workdir / MARKER).is_file():
        return
    if workdir.exists() and any(workdir.iterdir()):
        raise UserError(f"{workdir}: exists and is not an llmopt work directory (no {MARKER}); convert writes only "
                        "into a directory it created", "pass -w with a new or empty directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / f"{MARKER}.tmp"
        tmp.write_text(json.dumps({"llmopt_version": __version__}) + "\n")
        os.replace(tmp, workdir / MARKER)
    except OSError as exc:
        raise UserError(f"{workdir}: cannot create the work directory ({exc.strerror})",
                        "pass -w with a location you can write to") from None


@contextmanager
def locked_workdir(workdir: Path) -> Iterator[Path]:
    """Claim ``workdir`` for this convert and hold its lock until the body ends (the kernel frees it on death)."""
    _claim(workdir)
    fd = os.open(workdir / MARKER, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{workdir}: another llmopt convert is running in this work directory",
                            "wait for it to finish or pass another -w") from None
        yield workdir
    finally:
        os.close(fd)

"""Named points where tests kill the process (``LLMOPT_KILL_AT=<stage>:<point>``), to prove that kill -9
anywhere in a stage leaves nothing that a rerun would reuse. Points, in order: ``staged`` (staging
directory created), ``ran`` (stage wrote its files, no manifest yet), ``manifest`` (manifest written in
staging, not committed), ``swapped`` (previous output moved aside, new one not yet in place)."""

from __future__ import annotations

import os
import signal

ENV = "LLMOPT_KILL_AT"


def point(stage: str, name: str) -> None:
    if os.environ.get(ENV) == f"{stage}:{name}":
        os.kill(os.getpid(), signal.SIGKILL)

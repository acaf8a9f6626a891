"""Run ``llmopt`` commands as separate processes without paying the imports each time.

A server process imports llmopt's heavy modules (torch, transformers, onnx, onnxruntime) once, runs no
model code, and forks one child per command; the child sets the command's environment, sends its
stdout/stderr to files and runs the CLI's ``main``. Each command is still its own process, so
``kill -9`` (``LLMOPT_KILL_AT``) kills it exactly as it would kill ``python -m llmopt``: no handler, no
cleanup, the kernel releases its locks. What is saved is the ~5-7 s of imports per command.

Used by the kill tests, which run dozens of commands. Linux only (fork); elsewhere, and if the server
cannot start, commands run as ``python -m llmopt`` subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER = r"""
import json, os, sys, traceback
chan = os.fdopen(os.dup(1), "w")  # replies only; anything else printed to stdout goes nowhere
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
import llmopt.convert, llmopt.stages.quantize, llmopt.stages.build_ort, llmopt.stages.validate  # noqa: F401
import llmopt.runtime.ort_session  # noqa: F401
from llmopt.cli import main
print(json.dumps({"ready": True}), file=chan, flush=True)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.environ.clear(); os.environ.update(req["env"])
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd); os.close(f)
            code = main(req["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=chan, flush=True)
"""


class Runner:
    """``run(argv, env)`` -> CompletedProcess (returncode negative when killed by a signal)."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="llmopt-forkrun-"))
        self._proc: subprocess.Popen | None = None
        if hasattr(os, "fork"):
            try:
                self._proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, text=True)
                if json.loads(self._proc.stdout.readline() or "{}").get("ready") is not True:
                    self.close()
            except (OSError, ValueError):
                self.close()

    def run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        if self._proc is None:
            return subprocess.run([sys.executable, "-m", "llmopt", *argv], capture_output=True, text=True,
                                  env=env, timeout=600)
        out, err = self._dir / "stdout", self._dir / "stderr"
        self._proc.stdin.write(json.dumps({"argv": argv, "env": env, "stdout": str(out), "stderr": str(err)}) + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError("the fork server died")
        return subprocess.CompletedProcess(argv, json.loads(reply)["rc"], out.read_text(), err.read_text())

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
            self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)

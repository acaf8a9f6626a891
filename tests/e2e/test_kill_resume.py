"""kill -9 from outside while export runs, rerun: it finishes and never reuses a half-written directory.

tests/corpus/test_kill.py kills at named points of every stage (staged / ran / manifest / swapped,
from inside); this one adds a kill by another process, through the process group, at whatever moment
the poll first sees export's staging directory. One stage is enough for that (validate was a second
victim: the same mechanism for one more full convert)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmopt.artifact import read_manifest

RECIPE = """
name: kill
model: {source: "preset:tiny-qwen2"}
envelope: {batch: [1, 1, 2], input_len: [1, 32, 128], total_len: [1, 64, 256]}
validate: {eval_tokens: 512, decode_tokens: 8, gates: {max_logits_rel_error: 1.0e-4}}
"""


def _convert(recipe: Path, work: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmopt", "convert", str(recipe), "-w", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
def test_kill_during_stage_then_resume(tmp_path):
    victim = "onnx"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    work = tmp_path / "w"
    proc = _convert(recipe, work)
    deadline = time.time() + 180
    while time.time() < deadline and not list(work.glob(f"{victim}.partial-*")):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    assert list(work.glob(f"{victim}.partial-*")), f"never saw {victim} being built"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_manifest(work / victim) is None  # nothing half-written appears as the artifact

    done = _convert(recipe, work)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err.decode()
    assert read_manifest(work / victim) is not None
    assert not list(work.glob("*.partial-*")) and not list(work.glob("*.trash-*"))
    assert "load: up to date, reusing" in err.decode()

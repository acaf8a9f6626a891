"""Faults from the machine rather than the input: disk full, read-only location, Ctrl-C, a second
convert on the same work directory, and a real bug (which must keep its traceback and not exit 1)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LLMOPT = [sys.executable, "-m", "llmopt"]


def _can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces (unshare -m)")


def _in_mount(options: str, target: Path, argv: list[str]) -> subprocess.CompletedProcess:
    target.mkdir(exist_ok=True)
    cmd = f"mount -t tmpfs -o {options} tmpfs {target} && exec \"$@\""
    return subprocess.run(["unshare", "-m", "sh", "-c", cmd, "sh", *argv], capture_output=True, text=True, timeout=300)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@needs_mount
def test_disk_full_is_one_line(tmp_path):
    mnt = tmp_path / "small"
    r = _in_mount("size=600k", mnt, [*LLMOPT, "load", "preset:tiny-llama", "-o", str(mnt / "out")])
    assert r.returncode == 1, r.stderr
    assert "no space left on device" in _one_error_line(r.stderr)


@needs_mount
def test_read_only_location_is_one_line(tmp_path):
    mnt = tmp_path / "ro"
    r = _in_mount("ro,size=1m", mnt, [*LLMOPT, "load", "preset:tiny-llama", "-o", str(mnt / "out")])
    assert r.returncode == 1, r.stderr
    assert "read-only file system" in _one_error_line(r.stderr).lower()


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_removes_staging(tiny_ckpt, tmp_path):
    out = tmp_path / "onnx"
    # SIGINT back to its default in the child: a suite started in the background of a non-interactive shell
    # inherits SIGINT ignored, and llmopt keeps an ignored SIGINT ignored (nohup semantics)
    p = subprocess.Popen([*LLMOPT, "export", str(tiny_ckpt), "-o", str(out)], stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(tmp_path.glob("onnx.partial-*")) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (SIGINT)")
    assert sorted(x.name for x in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_second_convert_on_a_work_dir_gets_one_line_and_the_first_completes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: two\nmodel: {source: 'preset:tiny-llama'}\n"
                      "envelope: {batch: [1, 1, 1], input_len: [1, 8, 16], total_len: [1, 16, 32]}\n")
    work = tmp_path / "w"
    first = subprocess.Popen([*LLMOPT, "convert", str(recipe), "-w", str(work)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(work.glob("*.partial-*")) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run([*LLMOPT, "convert", str(recipe), "-w", str(work)], capture_output=True, text=True)
    assert second.returncode == 1
    assert "another llmopt convert is running" in _one_error_line(second.stderr)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err


def test_live_staging_of_another_run_is_not_swept(tmp_path):
    from llmopt.staging import staging_dir, sweep_stale

    out = tmp_path / "out"
    with staging_dir(out) as live:
        (live / "half.bin").write_bytes(b"x")
        dead = tmp_path / "out.partial-dead"
        dead.mkdir()
        sweep_stale(out)  # as a second run writing the same output would
        assert live.exists() and not dead.exists()


def test_a_bug_keeps_its_traceback_and_exits_70(cli, monkeypatch):
    import llmopt.doctor

    def broken():
        return {}["no such key"]

    monkeypatch.setattr(llmopt.doctor, "diagnose", broken)
    r = cli("doctor")
    assert r.code == 70
    assert "Traceback" in r.err and "KeyError" in r.err and "internal error" in r.err

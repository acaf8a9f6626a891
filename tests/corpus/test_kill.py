"""kill -9 at every named point of every stage, then rerun: the chain completes and never reuses a
partial output.

One work directory goes through the kills in order, each rerun getting one point further (so every
rerun after a kill is also the next kill: no run is spent only on recovering), then through a forced
pass that kills each stage after its old output was moved aside (``swapped``). The forced pass uses
``--from STAGE --force``: forcing from the first stage would rebuild every upstream stage again before
reaching the swap, which proves nothing more about the swap.

Each command is its own process, killed by SIGKILL at the point (llmopt.faults); the processes are
forked from one that imported llmopt once (tests/corpus/forkrun.py), which saves the imports, not
the kill.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from llmopt.artifact import read_manifest
from llmopt.convert import DIRS
from llmopt.faults import ENV
from tests.corpus.forkrun import Runner

# gates: none: the property under test is kill/rerun, not quality (default gates are calibrated on
# preset:tiny-trained; a random-weight model's near-tied logits make top-1 agreement noise).
# total_len max 128 < validate's 256-token windows: validate fits its shapes into the engine's KV capacity.
RECIPE = """
name: kill
model: {source: "preset:tiny-llama"}
quantize: {method: rtn, bits: 8, group_size: null}
envelope: {batch: [1, 1, 2], input_len: [1, 16, 64], total_len: [1, 32, 128]}
validate: {eval_tokens: 256, decode_tokens: 4, gates: none}
"""
STAGES = ["load", "quantize", "export", "build", "validate"]
POINTS = ["staged", "ran", "manifest"]


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


def _convert(runner: Runner, recipe: Path, work: Path, kill_at: str | None, *extra: str):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if kill_at:
        env[ENV] = kill_at
    return runner.run(["convert", str(recipe), "-w", str(work), *extra], env)


def _no_leftovers_reused(work: Path) -> None:
    for name in DIRS.values():
        out = work / name
        if out.exists():
            assert read_manifest(out) is not None, f"{out} exists without a valid manifest"


def _clean(work: Path) -> None:
    assert not list(work.glob("*.partial-*")) and not list(work.glob("*.trash-*"))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 27 commands of a tiny preset; about a third of that on a loaded 2-core runner
def test_kill_9_at_every_point_of_every_stage_then_rerun(tmp_path, runner):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    work = tmp_path / "w"
    killed = None  # the stage the previous run was killed in
    for stage in STAGES:
        for point in POINTS:
            r = _convert(runner, recipe, work, f"{stage}:{point}")
            assert r.returncode == -signal.SIGKILL, (stage, point, r.stderr)
            if killed is not None:  # this run is also the rerun after the previous kill
                assert f"{killed}: up to date" not in r.stderr, r.stderr
                if killed != stage:
                    assert f"{killed}: wrote" in r.stderr, r.stderr
            assert read_manifest(work / DIRS[stage]) is None  # the killed stage's output never appears
            _no_leftovers_reused(work)
            partials = list(work.glob(f"{DIRS[stage]}.partial-*"))
            assert len(partials) == 1, f"the kill left its staging directory, and the rerun swept the older: {partials}"
            killed = stage
    done = _convert(runner, recipe, work, None)
    assert done.returncode == 0, done.stderr
    assert "validate: wrote" in done.stderr and "validate: up to date" not in done.stderr
    _clean(work)

    for stage in STAGES:  # forced: the stage replaces its output; die between moving the old one and the new
        r = _convert(runner, recipe, work, f"{stage}:swapped", "--from", stage, "--force")
        assert r.returncode == -signal.SIGKILL, (stage, r.stderr)
        assert not (work / DIRS[stage]).exists()
        _no_leftovers_reused(work)
        again = _convert(runner, recipe, work, None)
        assert again.returncode == 0, again.stderr
        assert f"{stage}: wrote" in again.stderr and f"{stage}: up to date" not in again.stderr
        _clean(work)
    final = _convert(runner, recipe, work, None)
    assert final.returncode == 0, final.stderr
    assert all(f"{s}: up to date" in final.stderr for s in STAGES), final.stderr

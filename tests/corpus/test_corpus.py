"""Run every case of the fault corpus against the CLI and check the clean outcome:

- the exit code is the case's (1 user error, 2 gate failed), never a bug's;
- stderr has no traceback and exactly one ``error:`` / ``validation failed:`` line (a recipe error adds
  one ``•`` line per bad field);
- no file that existed before changed or vanished (the inputs, the session fixtures);
- whatever new appeared is a complete artifact (valid manifest) or convert's own bookkeeping: nothing
  half-written, no staging leftovers; and no code from the input ran.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from llmopt.artifact import read_manifest
from llmopt.integrity import VERIFIED
from llmopt.workdir import MARKER
from tests.corpus.cases import CASES, Ctx

PWNED = Path("/tmp/llmopt-corpus-pwned")

HEADS = ("error:", "validation failed:")


def snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and p.name != VERIFIED:
                out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _owned_by_artifact(p: Path, root: Path) -> bool:
    for parent in p.parents:
        if parent == root.parent:
            return False
        if read_manifest(parent) is not None:
            return True
    return False


def check_clean(code: int, err: str, codes: set, before: dict, after: dict, root: Path) -> None:
    assert code in codes, f"exit {code}, expected {codes}:\n{err}"
    assert "Traceback" not in err, err
    heads = [line for line in err.splitlines() if line.startswith(HEADS)]
    assert len(heads) == 1, err
    tail = err[err.index(heads[0]):].splitlines()[1:]
    assert all(line.startswith("• ") for line in tail), err
    changed = [str(p) for p, h in before.items() if after.get(p) != h]
    assert not changed, f"user files changed or removed: {changed}"
    new = [p for p in after if p not in before]
    stray = [str(p) for p in new if p.name not in (MARKER, "recipe.resolved.yaml") and not _owned_by_artifact(p, root)]
    assert not stray, f"half-written files: {stray}"
    leftovers = [str(p) for p in root.rglob("*") if ".partial-" in p.name or ".trash-" in p.name]
    assert not leftovers, leftovers
    assert not PWNED.exists(), "code from an input ran"


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_fails_cleanly(name, cli, tiny_ckpt, tiny_onnx, tmp_path):
    ctx = Ctx(tmp=tmp_path, ckpt_artifact=tiny_ckpt, onnx_artifact=tiny_onnx)
    argv, codes = CASES[name](ctx)
    roots = (tmp_path, tiny_ckpt, tiny_onnx)
    before = snapshot(*roots)
    r = cli(*argv)
    check_clean(r.code, r.err, codes, before, snapshot(*roots), tmp_path)

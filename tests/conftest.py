"""Shared fixtures: tiny checkpoints and a CLI runner that captures exit code and output."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    from llmopt.cli import main

    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """preset:tiny-llama loaded once as a checkpoint artifact."""
    from llmopt.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    assert main(["-q", "load", "preset:tiny-llama", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_ckpt, tmp_path_factory) -> Path:
    from llmopt.cli import main

    out = tmp_path_factory.mktemp("onnx") / "tiny-llama-onnx"
    assert main(["-q", "export", str(tiny_ckpt), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def gptq_int4_workdir(tmp_path_factory) -> Path:
    """One convert work directory for the recipes that share load + GPTQ int4 g128 + export
    (recipes/int4-gptq.yaml, recipes/int4-cpu-fast.yaml): whichever test converts first pays for the
    GPTQ calibration, the other's convert reuses those stages by key (and rebuilds only build/validate).
    Each test still runs its own convert and reads its own report."""
    return tmp_path_factory.mktemp("gptq-int4") / "w"

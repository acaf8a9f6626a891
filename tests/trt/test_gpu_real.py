"""Real TensorRT on a real GPU: ``llmopt convert`` of the three TensorRT recipes, the session, the timing cache.

Every test marked ``gpu`` here is SKIPPED on machines without TensorRT or a CUDA GPU -- which includes the
machines this project is developed and CI-tested on. Until someone runs ``pytest -m gpu tests/trt`` on a
GPU, nothing that touches real TensorRT has been verified. The one unmarked test only checks that the
recipes parse and their envelopes give valid profiles.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmopt.recipe import load_recipe
from llmopt.trt.profiles import derive_profiles

from .conftest import make_io

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"trt-fp16.yaml": "fp16", "trt-int8-smoothquant.yaml": "int8", "trt-int4-awq.yaml": "int4"}


def _ready() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not _ready(), reason="needs TensorRT and a CUDA GPU: pip install 'llmopt[gpu]'")


def llmopt(*args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmopt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_trt_recipes_parse_and_give_valid_profiles() -> None:
    for name in RECIPES:
        recipe = load_recipe(ROOT / "recipes" / name)
        assert recipe.build.backend == "tensorrt" and recipe.build.device == "cuda"
        assert recipe.validate_ is not None and recipe.validate_.gates != type(recipe.validate_.gates)()
        assert len(derive_profiles(recipe.envelope, make_io())) == 2


@pytest.fixture(scope="module")
def fp16_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("trt-fp16")
    proc = llmopt("convert", ROOT / "recipes" / "trt-fp16.yaml", "-w", wd, "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_convert_passes_validate_gates(recipe: str, tmp_path: Path) -> None:
    proc = llmopt("convert", ROOT / "recipes" / recipe, "-w", tmp_path / "w", "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]  # exit 2 would mean a gate failed
    result = json.loads(proc.stdout)
    assert result["validation"]["passed"] is True
    engine = Path(result["stages"]["build"]["path"])
    meta = json.loads((engine / "engine.json").read_text())
    assert meta["precision"]["mode"].startswith(RECIPES[recipe])
    assert (engine / "model.engine").stat().st_size > 0 and (engine / "build.log").exists()


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
def test_session_decodes_like_a_longer_prefill(fp16_workdir: Path) -> None:
    from llmopt.runtime.trt_session import TrtSession

    s = TrtSession(fp16_workdir / "engine")
    prompt = np.arange(3, 3 + 12, dtype=np.int64)[None]
    full = s.prefill(prompt)
    s.prefill(prompt[:, :-1])
    last = s.decode(prompt[:, -1])  # profile 1, past from profile 0's present
    assert last.shape == (1, 1, s.dims.vocab_size)
    assert last[0, 0].argmax() == full[0, -1].argmax()
    np.testing.assert_allclose(last[0, 0], full[0, -1], rtol=2e-2, atol=1e-1)  # float16 engine


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
def test_rebuild_reuses_the_timing_cache(fp16_workdir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    metas = []
    for i in range(2):
        proc = llmopt("build", fp16_workdir / "onnx", "-o", tmp_path / f"e{i}", "--backend", "tensorrt",
                      "--device", "cuda", "--timing-cache", cache, "--json")
        assert proc.returncode == 0, proc.stderr[-4000:]
        metas.append(json.loads((tmp_path / f"e{i}" / "manifest.json").read_text())["metadata"])
    assert metas[0]["timing_cache"]["reused"] is False and metas[1]["timing_cache"]["reused"] is True
    assert cache.stat().st_size > 0


@pytest.mark.gpu
@needs_gpu
def test_engine_from_another_gpu_is_refused(fp16_workdir: Path, tmp_path: Path) -> None:
    import shutil

    from llmopt.errors import UserError
    from llmopt.runtime.trt_session import TrtSession

    moved = tmp_path / "engine"
    shutil.copytree(fp16_workdir / "engine", moved)
    meta = json.loads((moved / "engine.json").read_text())
    meta["gpu"] = {"name": "Some Other GPU", "compute_capability": "5.0"}
    (moved / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="built for compute capability 5.0"):
        TrtSession(moved)

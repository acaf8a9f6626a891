"""The shipped quantization recipes run end to end on the embedded model and their gates pass."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["int8-rtn", "int4-gptq", "int4-awq", "w8a8-smoothquant"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_quant_recipe_converts_and_passes_gates(cli, tmp_path, name, request):
    # int4-gptq shares its load/quantize/export with int4-cpu-fast (tests/runtime/test_kv_int8.py)
    w = request.getfixturevalue("gptq_int4_workdir") if name == "int4-gptq" else tmp_path / "w"
    r = cli("convert", ROOT / "recipes" / f"{name}.yaml", "-w", w, "--json")
    assert r.code == 0, r.err
    report = json.loads((w / "report" / "report.json").read_text())
    assert "quantization" in report and "conversion" in report
    gated = [c for c in report["checks"] if c["threshold"] is not None]
    assert len(gated) >= 4 and all(c["passed"] for c in gated)

"""End to end: `llmopt convert` for every architecture preset, fp32, ONNX Runtime on CPU."""

import json
from pathlib import Path

import pytest

ARCHS = ["llama", "mistral", "qwen2", "phi3", "gpt2"]


def recipe(tmp_path: Path, arch: str) -> Path:
    p = tmp_path / f"{arch}.yaml"
    p.write_text(f"""
name: e2e-{arch}
model: {{source: "preset:tiny-{arch}"}}
envelope: {{batch: [1, 1, 4], input_len: [1, 64, 256], total_len: [1, 128, 512]}}
validate:
  eval_tokens: 1024
  decode_tokens: 32
  gates: {{max_logits_rel_error: 1.0e-4, min_greedy_agreement: 1.0, min_top1_agreement: 0.999}}
""")
    return p


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_convert_every_architecture(cli, tmp_path, arch):
    r = cli("convert", recipe(tmp_path, arch), "-w", tmp_path / "w", "--json")
    assert r.code == 0, r.err
    result = r.json()
    assert result["validation"]["passed"] is True
    report = json.loads((tmp_path / "w" / "report" / "report.json").read_text())
    conv = report["conversion"]
    assert conv["logits"]["max_rel"] <= 1e-4
    assert conv["greedy"]["agreement"] == 1.0 and conv["greedy"]["new_tokens"] == 32
    assert conv["logits"]["lengths"] == [7, 19, 32, 12]  # unequal lengths: padding exercised
    assert (tmp_path / "w" / "recipe.resolved.yaml").exists()
    again = cli("convert", recipe(tmp_path, arch), "-w", tmp_path / "w", "--json")
    assert again.code == 0 and all(s["reused"] for s in again.json()["stages"].values())
    assert "up to date, reusing" in again.err

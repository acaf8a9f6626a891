"""Peak RSS of export and build, measured on a separate process, stays a fraction of the model's bytes.

The model (~80M parameters: 310 MB of float32 ONNX weights, largest tensor 34 MB) is big enough that holding
the weights even once shows; the bound is on the peak ABOVE the same command on the tiny preset (Python,
torch and ONNX Runtime themselves), so it measures what the stage holds because of the model's size.
Before streaming, export held ~3x and build ~4x the model bytes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import transformers

from llmopt.models import presets

pytestmark = pytest.mark.slow


def peak_rss(*args: str) -> int:
    """Run ``llmopt ARGS`` in its own process and sample its RSS every 20 ms."""
    proc = subprocess.Popen([sys.executable, "-m", "llmopt", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return peak


@pytest.fixture(scope="module")
def mid_ckpt(tmp_path_factory) -> Path:
    hf = tmp_path_factory.mktemp("mid") / "hf"
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    model.save_pretrained(hf)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(presets.TINY_TRAINED / f, hf)
    out = hf.parent / "ckpt"
    subprocess.run([sys.executable, "-m", "llmopt", "load", str(hf), "-o", str(out)], check=True, capture_output=True)
    return out


def test_export_and_build_peak_rss_is_a_fraction_of_the_model(mid_ckpt, tiny_ckpt, tmp_path):
    base_export = peak_rss("export", str(tiny_ckpt), "-o", str(tmp_path / "tx"))
    export = peak_rss("export", str(mid_ckpt), "-o", str(tmp_path / "x"))
    model_bytes = (tmp_path / "x" / "model.onnx.data").stat().st_size
    assert model_bytes > 250e6
    base_build = peak_rss("build", str(tmp_path / "tx"), "-o", str(tmp_path / "te"))
    build = peak_rss("build", str(tmp_path / "x"), "-o", str(tmp_path / "e"))
    report = {"model_bytes": model_bytes, "export_over_tiny": export - base_export, "build_over_tiny": build - base_build}
    print(json.dumps(report))
    assert export - base_export < 0.5 * model_bytes, report
    # build: one ONNX Runtime session of the engine is the floor (~1.3x the weights)
    assert build - base_build < 1.6 * model_bytes, report

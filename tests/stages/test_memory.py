"""Peak memory of the streaming stages, measured on a child process: load and RTN quantize of a ~380 MB
float32 checkpoint must stay within a fraction of the model bytes above the interpreter's own baseline
(the same command on a tiny preset). Materializing the model would cost at least 1x the model bytes.
GPTQ of a small model with a wide MLP must hold about two float32 copies of its largest Hessian, not the
float64 chain of copies, nor all calibration tokens' intermediates at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LLMOPT = [sys.executable, "-m", "llmopt", "-q"]
# the peak RSS of the command's process (its only child), in KB
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def peak_rss_mb(cmd: list[str]) -> float:
    r = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1]) / 1024


def write_checkpoint(src: Path, dtype: torch.dtype = torch.float32, **shape) -> int:
    """A random untied Llama of ``shape``, written tensor by tensor with a tokenizer; its bytes."""
    import transformers

    from llmopt.models import presets
    from llmopt.models.loader import expected_tensors
    from llmopt.models.registry import spec_for
    from llmopt.models.safetensors_io import CheckpointWriter, TensorSpec

    src.mkdir(parents=True)
    cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    expected, _ = expected_tensors(cfg, spec_for("llama"))
    plan = [TensorSpec(n, dtype, s) for n, s in expected.items()]
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(src, plan) as w:
        for s in plan:
            w.write(s.name, torch.ones(s.shape) if len(s.shape) == 1 else torch.randn(s.shape, generator=g) * 0.02)
    cfg.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((presets.TINY_TRAINED / f).read_bytes())
    return sum(s.nbytes for s in plan)


@pytest.fixture(scope="module")
def baseline_mb(tmp_path_factory) -> float:
    """The interpreter's own peak: load of a tiny preset."""
    return peak_rss_mb([*LLMOPT, "load", "preset:tiny-llama", "-o", str(tmp_path_factory.mktemp("tiny") / "t")])


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, int]:
    """A random Llama (hidden 1024, 6 layers, vocab 8192, untied), float32, written tensor by tensor."""
    src = tmp_path_factory.mktemp("big") / "hf"
    nbytes = write_checkpoint(src, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                              num_attention_heads=16, num_key_value_heads=16, vocab_size=8192)
    return src, nbytes


@pytest.mark.slow
def test_load_and_rtn_quantize_hold_a_tensor_not_the_model(big_checkpoint, baseline_mb, tmp_path):
    src, nbytes = big_checkpoint
    assert nbytes > 350e6
    model_mb = nbytes / 2**20
    base = baseline_mb
    load = peak_rss_mb([*LLMOPT, "load", str(src), "-o", str(tmp_path / "ckpt")])
    quant = peak_rss_mb([*LLMOPT, "quantize", str(tmp_path / "ckpt"), "-o", str(tmp_path / "q"), "--bits", "4"])
    meta = json.loads((tmp_path / "q" / "manifest.json").read_text())["metadata"]
    assert meta["streaming"] == "per tensor (no model)" and meta["quantized_linears"] == 6 * 7
    # largest tensor: the 8192 x 1024 embedding, 32 MB; a few float32 copies of one tensor are allowed
    for name, peak in (("load", load), ("quantize", quant)):
        assert peak - base < 0.25 * model_mb, (name, peak, base, model_mb)


@pytest.mark.slow
def test_gptq_holds_two_float32_hessians_not_float64_copies(baseline_mb, tmp_path):
    """2 layers, hidden 256, MLP 4096 wide: down_proj's Hessian is 4096² float32 = 64 MiB, the rest small
    (model 35 MiB). 16 x 256 calibration tokens: one forward over all of them would hold 4096 x 4096 float32
    MLP intermediates (64 MiB each). Measured above the interpreter: 799 MiB (12.5x the Hessian) with the
    float64 factorization's copies and one forward for all tokens; 206 MiB (3.2x: Hessian, its in-place
    float32 factor, the weights' copies, one batch's forward). One more float64 copy of H, or the forward
    over all tokens, would cross the 4.5x bound. ~25 s of CPU."""
    nbytes = write_checkpoint(tmp_path / "hf", hidden_size=256, intermediate_size=4096, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=4096)
    hessian_mb = 4096 * 4096 * 4 / 2**20
    subprocess.run([*LLMOPT, "load", str(tmp_path / "hf"), "-o", str(tmp_path / "ckpt")], check=True)
    peak = peak_rss_mb([*LLMOPT, "quantize", str(tmp_path / "ckpt"), "-o", str(tmp_path / "q"), "--method", "gptq",
                        "--bits", "4", "--group-size", "128", "--samples", "16", "--seq-len", "256"])
    meta = json.loads((tmp_path / "q" / "manifest.json").read_text())["metadata"]
    assert meta["quantized_linears"] == 2 * 7 and meta["error_summary"]["worse_than_rtn"] == 0
    cal = meta["calibration"]
    assert cal["batch"] == 2 and 0 < cal["activation_bytes"] < 16 * 256 * 256 * 4 * 1.2
    assert peak - baseline_mb < 4.5 * hessian_mb, (peak, baseline_mb, hessian_mb, nbytes / 2**20)
    res = meta["resources"]  # the preflight estimate (llmopt.estimates.calibrated_estimate) against the peak
    assert 0.8 < res["peak_rss_ratio"] < 1.25, res

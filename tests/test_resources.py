"""Preflight: estimates from headers only, refusal when they do not fit, estimate vs measured in the manifest."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import psutil
import pytest

from llmopt.artifact import Artifact
from llmopt.errors import UserError
from llmopt.estimates import export_estimate
from llmopt.recipe import ExportConfig
from llmopt.resources import Estimate, check


def _sparse_checkpoint(directory: Path, vocab: int, hidden: int = 64) -> None:
    """A Llama checkpoint whose embedding is ``vocab x hidden`` float32, as a sparse file: the header says how
    big it is, no byte of it is on disk (so only a header-reading estimator can handle it)."""
    directory.mkdir()
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": vocab, "tie_word_embeddings": True, "max_position_embeddings": 128}
    (directory / "config.json").write_text(json.dumps(cfg))
    n = vocab * hidden * 4
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [vocab, hidden],
                                                       "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + n)


def test_export_estimate_reads_headers_only_and_refuses_what_cannot_fit(tmp_path):
    total = psutil.virtual_memory().total
    vocab = int(total // (64 * 4)) + 1  # one float32 embedding larger than all the memory of this machine
    _sparse_checkpoint(tmp_path / "big", vocab)
    art = Artifact(tmp_path / "big", {"kind": "checkpoint", "stage": "load", "key": "x", "metadata": {}})
    est = export_estimate(ExportConfig(), [art])
    assert est.basis["largest_tensor_out"] == vocab * 64 * 4
    assert est.peak_rss_bytes > total and est.disk_bytes >= vocab * 64 * 4
    with pytest.raises(UserError, match=r"export: needs about .* GB of memory .* GB available"):
        check("export", est, tmp_path / "out", force=False)
    check("export", est, tmp_path / "out", force=True)  # --force runs anyway
    half = export_estimate(ExportConfig(dtype="float16"), [art])
    assert half.basis["largest_tensor_out"] == vocab * 64 * 2


def test_disk_refusal(tmp_path):
    with pytest.raises(UserError, match="writes about .* GB free"):
        check("build", Estimate(1, 1 << 60, 1.0), tmp_path, force=False)


def test_manifest_records_estimate_and_measured_peak(cli, tiny_ckpt, tmp_path):
    r = cli("export", tiny_ckpt, "-o", tmp_path / "x", "--json")
    assert r.code == 0, r.err
    res = r.json()["metadata"]["resources"]
    assert res["measured"]["peak_rss_bytes"] >= res["measured"]["start_rss_bytes"] > 0
    assert res["estimate"]["disk_bytes"] > 0 and res["measured"]["disk_bytes"] >= res["estimate"]["disk_bytes"]
    assert 0 < res["peak_rss_ratio"] < 4
    r = cli("inspect", tmp_path / "x", "--json")
    assert r.code == 0
    info = r.json()
    assert info["metadata"]["resources"]["estimate"]["peak_rss_bytes"] == res["estimate"]["peak_rss_bytes"]
    assert info["next_stage_estimate"]["stage"] == "build"


def test_load_and_rtn_quantize_are_estimated_and_refused_from_headers(tmp_path):
    """A safetensors source too big for this machine is refused by `load` and RTN `quantize` before any
    tensor is read (the sparse file has no byte of data), with --force as the way past."""
    from llmopt.recipe import LoadConfig, QuantizeConfig
    from llmopt.stages import load, quantize

    total = psutil.virtual_memory().total
    vocab = int(total // (64 * 4)) + 1
    _sparse_checkpoint(tmp_path / "big", vocab)
    est = load.STAGE.estimate(LoadConfig(source=str(tmp_path / "big")), [])
    assert est.basis["largest_tensor_out"] == vocab * 64 * 4 and est.disk_bytes == vocab * 64 * 4
    with pytest.raises(UserError, match=r"load: needs about .* GB of memory"):
        check("load", est, tmp_path / "out", force=False)
    half = load.STAGE.estimate(LoadConfig(source=str(tmp_path / "big"), dtype="bfloat16"), [])
    assert half.disk_bytes == vocab * 64 * 2
    art = Artifact(tmp_path / "big", {"kind": "checkpoint", "stage": "load", "key": "x", "metadata": {}})
    q = quantize.STAGE.estimate(QuantizeConfig(method="rtn"), [art])
    assert q.peak_rss_bytes > total
    g = quantize.STAGE.estimate(QuantizeConfig(method="gptq"), [art])  # calibrated: embeddings in float32 first
    assert g.basis["outside_layers_float32"] == vocab * 64 * 4 and g.peak_rss_bytes > total
    with pytest.raises(UserError, match=r"quantize: needs about .* GB of memory"):
        check("quantize", g, tmp_path / "out", force=False)
    assert load.STAGE.estimate(LoadConfig(source="preset:tiny-llama"), []) is None


def test_load_and_rtn_record_estimate_next_to_measured(cli, tiny_ckpt, tmp_path):
    r = cli("load", tiny_ckpt, "-o", tmp_path / "c", "--json")  # a checkpoint directory is a load source
    assert r.code == 0, r.err
    res = r.json()["metadata"]["resources"]
    assert 0.5 < res["peak_rss_ratio"] < 1.5
    assert 0.8 * res["measured"]["disk_bytes"] < res["estimate"]["disk_bytes"] <= res["measured"]["disk_bytes"]  # + tokenizer
    r = cli("quantize", tmp_path / "c", "-o", tmp_path / "q", "--method", "rtn", "--bits", "4", "--json")
    assert r.code == 0, r.err
    res = r.json()["metadata"]["resources"]
    assert 0.5 < res["peak_rss_ratio"] < 1.5
    tensors = res["measured"]["disk_bytes"]
    assert 0.5 * tensors < res["estimate"]["disk_bytes"] < 1.5 * tensors


@pytest.mark.parametrize("method,bits", [("gptq", 4), ("awq", 4), ("smoothquant", 8)])
def test_calibrated_methods_record_estimate_next_to_measured(cli, tiny_ckpt, tmp_path, method, bits):
    r = cli("load", tiny_ckpt, "-o", tmp_path / "c")
    assert r.code == 0, r.err
    r = cli("quantize", tmp_path / "c", "-o", tmp_path / "q", "--method", method, "--bits", bits, "--samples", 4,
            "--seq-len", 64, "--json")
    assert r.code == 0, r.err
    res = r.json()["metadata"]["resources"]
    basis = res["estimate"]["basis"]
    assert basis["calibration_tokens"] == 4 * 64 and basis["layer_phase"] > basis["layer_float32"] > 0
    assert 0.5 < res["peak_rss_ratio"] < 1.5
    assert 0.5 * res["measured"]["disk_bytes"] < res["estimate"]["disk_bytes"] < 1.5 * res["measured"]["disk_bytes"]


_FRAGMENT = """
import sys, psutil, torch
if sys.argv[1] == "on":
    from llmopt.resources import return_freed_memory_promptly
    assert return_freed_memory_promptly()
n = 4 << 20  # 16 MB of float32: under glibc's 32 MB ceiling for its dynamic mmap threshold
a = torch.ones(n); del a        # by default this raises the threshold to 16 MB
base = psutil.Process().memory_info().rss
b = [torch.ones(n) for _ in range(4)]; c = [torch.ones(256) for _ in range(64)]  # c sits above b in the heap
del b
print(psutil.Process().memory_info().rss - base)
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="glibc/Linux allocator behaviour")
def test_freed_tensors_go_back_to_the_system_with_the_fixed_mmap_threshold():
    import subprocess
    import sys

    kept = {m: int(subprocess.run([sys.executable, "-c", _FRAGMENT, m], capture_output=True, text=True,
                                  check=True).stdout) for m in ("off", "on")}
    assert kept["on"] < 8 << 20, kept          # 64 MB freed at once
    assert kept["off"] > 32 << 20, kept        # what the fix is for: glibc's default keeps it resident

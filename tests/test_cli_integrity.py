"""A changed artifact is caught before any number is produced from it; `verify` checks a lineage."""

import json
import shutil

import numpy as np
import pytest

from llmopt.artifact import MANIFEST


def _corrupt_same_size(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))


@pytest.fixture
def corrupted_onnx(tiny_onnx, tmp_path):
    copy = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, copy)
    _corrupt_same_size(copy / "model.onnx.data")
    return copy


@pytest.mark.parametrize("cmd", [["inspect"], ["generate", "--prompt", "The"], ["validate", "--no-gates"],
                                 ["build", "-o", "{tmp}/eng"], ["verify"]])
def test_same_size_corruption_is_exit_1_naming_the_file(cli, corrupted_onnx, tmp_path, cmd):
    args = [a.replace("{tmp}", str(tmp_path)) for a in cmd]
    r = cli(args[0], corrupted_onnx, *args[1:])
    assert r.code == 1, r.err
    assert "model.onnx.data" in r.err and "sha256 differs" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "eng").exists() and not (corrupted_onnx.parent / "onnx.report").exists()


def test_cache_hit_requires_matching_files(cli, tiny_ckpt, tiny_onnx, tmp_path):
    out = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, out)  # `export tiny_ckpt -o out` as the session fixture ran it: a cache hit
    assert cli("export", tiny_ckpt, "-o", out, "--json").json()["reused"] is True
    _corrupt_same_size(out / "model.onnx.data")
    r = cli("export", tiny_ckpt, "-o", out, "--json")
    assert r.code == 0 and r.json()["reused"] is False
    assert "rebuilding" in r.err and "sha256 differs" in r.err
    assert cli("verify", out).code == 0


def test_verify_whole_lineage_json(cli, tiny_onnx):
    r = cli("verify", tiny_onnx, "--json")
    assert r.code == 0, r.err
    info = r.json()
    assert info["ok"] is True and [a["stage"] for a in info["artifacts"]] == ["export", "load"]
    assert all(a["status"] == "ok" for a in info["artifacts"])


def test_verify_copied_artifact_reports_unreachable_lineage(cli, tiny_onnx, tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(tiny_onnx, copy)
    m = json.loads((copy / MANIFEST).read_text())
    m["inputs"][0]["path"] = "/elsewhere/on/the/build/machine"
    (copy / MANIFEST).write_text(json.dumps(m))
    r = cli("verify", copy, "--json")
    assert r.code == 0, r.err
    info = r.json()
    assert info["artifacts"][0]["status"] == "ok"
    assert info["artifacts"][1]["status"].startswith("not reachable") and info["not_reachable"] == 1


def test_verify_names_a_corrupted_ancestor(cli, tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    onnx = tmp_path / "onnx"
    assert cli("export", ckpt, "-o", onnx).code == 0
    _corrupt_same_size(ckpt / "model.safetensors")
    r = cli("verify", onnx, "--json")
    assert r.code == 1
    info = json.loads(r.out)
    assert [a["status"] for a in info["artifacts"]] == ["ok", "mismatch"]
    assert "model.safetensors" in r.err
    g = cli("generate", onnx, "--prompt", "The")  # the tokenizer comes through the lineage: checked too
    assert g.code == 1 and "model.safetensors" in g.err


def test_default_gates_pass_a_faithful_artifact_and_fail_garbage(cli, tiny_onnx, tmp_path):
    fast = ["--eval-tokens", "512", "--decode-tokens", "8"]
    ok = cli("validate", tiny_onnx, "-o", tmp_path / "ok", *fast, "--json")
    assert ok.code == 0, ok.err
    assert "gates: default for fp32" in ok.err and "PASSED" in ok.err
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["gates"]["min_top1_agreement"] == 0.995

    garbage = tmp_path / "garbage"
    shutil.copytree(tiny_onnx, garbage)
    data = garbage / "model.onnx.data"
    noise = np.random.default_rng(0).normal(0, 0.05, data.stat().st_size // 4).astype(np.float32)
    data.write_bytes(noise.tobytes())
    from llmopt.integrity import VERIFIED, hash_table

    m = json.loads((garbage / MANIFEST).read_text())
    (garbage / VERIFIED).unlink()
    m["files"], _ = hash_table(garbage)  # manifest re-made: integrity cannot catch it, the gates must
    (garbage / MANIFEST).write_text(json.dumps(m))
    bad = cli("validate", garbage, "-o", tmp_path / "bad", *fast)
    assert bad.code == 2, bad.err
    last = bad.err.strip().splitlines()[-1]
    assert last.startswith("validation failed:") and "top-1 agreement" in last and " < 0.995" in last

    ungated = cli("validate", garbage, "-o", tmp_path / "ungated", *fast, "--no-gates")
    assert ungated.code == 0 and "UNGATED" in ungated.err and "PASSED" not in ungated.err

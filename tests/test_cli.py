"""CLI contract: exit codes, one-line errors, --json on stdout, nothing half-written."""

import json
from pathlib import Path

from llmopt.artifact import read_manifest


def test_help_and_version(cli):
    r = cli("--version")
    assert r.code == 0 and "llmopt 0." in r.out


def test_usage_error_is_exit_1(cli):
    r = cli("load")
    assert r.code == 1 and "Missing argument" in r.err


def test_bad_option_value_is_exit_1_naming_the_field(cli, tiny_ckpt, tmp_path):
    r = cli("export", tiny_ckpt, "-o", tmp_path / "o", "--dtype", "int3")
    assert r.code == 1 and "dtype" in r.err and "Traceback" not in r.err


def test_missing_input_artifact(cli, tmp_path):
    r = cli("export", tmp_path / "nope", "-o", tmp_path / "o")
    assert r.code == 1 and "no such directory" in r.err


def test_wrong_kind_of_input(cli, tiny_ckpt, tmp_path):
    r = cli("build", tiny_ckpt, "-o", tmp_path / "o")
    assert r.code == 1 and "is a 'checkpoint' artifact, expected onnx" in r.err


def test_refuses_to_overwrite_foreign_directory(cli, tiny_ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = cli("export", tiny_ckpt, "-o", out)
    assert r.code == 1 and "not an llmopt artifact" in r.err
    assert (out / "precious.txt").read_text() == "keep me"


def test_recipe_typo_exit_1_one_line_per_field(cli, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {source: 'preset:tiny-llama', dtyp: float32}\nbuild: {threads: 0}\n")
    r = cli("convert", p, "-w", tmp_path / "w")
    assert r.code == 1
    assert "• model.dtyp: unknown field; allowed: dtype, max_shard_gb, source" in r.err
    assert "• build.threads:" in r.err
    assert "Traceback" not in r.err


def test_inspect_json_shows_lineage_and_io(cli, tiny_onnx):
    r = cli("inspect", tiny_onnx, "--json")
    assert r.code == 0
    info = r.json()
    assert [a["stage"] for a in info["lineage"]] == ["export", "load"]
    assert info["io"]["inputs"][0]["name"] == "input_ids"


def test_doctor_json(cli):
    r = cli("doctor", "--json")
    assert r.code == 0
    info = r.json()
    assert info["onnxruntime"]["loads"]["CPUExecutionProvider"] is True
    assert info["tensorrt"]["importable"] is False


def test_export_reuses_then_rebuilds_on_config_change(cli, tiny_ckpt, tmp_path):
    out = tmp_path / "onnx"
    first = cli("export", tiny_ckpt, "-o", out, "--json").json()
    again = cli("export", tiny_ckpt, "-o", out, "--json").json()
    assert not first["reused"] and again["reused"] and again["key"] == first["key"]
    changed = cli("export", tiny_ckpt, "-o", out, "--opset", "21", "--json").json()
    assert not changed["reused"] and changed["key"] != first["key"]
    assert read_manifest(out)["config"]["opset"] == 21
    forced = cli("export", tiny_ckpt, "-o", out, "--opset", "21", "--force", "--json").json()
    assert not forced["reused"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_validate_gate_failure_exits_2_and_keeps_report(cli, tiny_onnx, tmp_path):
    out = tmp_path / "rep"
    r = cli("validate", tiny_onnx, "-o", out, "--eval-tokens", "256", "--decode-tokens", "4",
            "--gate", "max_logits_rel_error=1e-12", "--json")
    assert r.code == 2
    assert "✗ [conversion] logits max relative error" in r.err
    assert json.loads(r.out)["passed"] is False
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and (out / "report.md").read_text().startswith("# Validation report: FAILED")


def test_generate_prints_completion(cli, tiny_onnx):
    r = cli("generate", tiny_onnx, "--prompt", "The file", "--max-new-tokens", "5", "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["finish_reason"] in ("stop", "length")
    assert len(out["token_ids"]) == 5 or (out["finish_reason"] == "stop" and out["token_ids"][-1] in out["eos_ids"])
    assert out["text"] in r.err  # streamed to stderr while stdout holds the JSON


def test_default_eval_text_content_is_in_the_key(monkeypatch, tmp_path, tiny_onnx):
    from llmopt.models import presets
    from llmopt.recipe import ValidateConfig
    from llmopt.runner import key_for
    from llmopt.stages import validate
    from llmopt.artifact import open_artifact

    art = open_artifact(tiny_onnx)
    shipped = presets.DEFAULT_EVAL_TEXT
    before, _ = key_for(validate.STAGE, ValidateConfig(), [art])
    fake = tmp_path / "eval.txt"
    fake.write_text("different text")
    monkeypatch.setattr(presets, "DEFAULT_EVAL_TEXT", fake)
    after, _ = key_for(validate.STAGE, ValidateConfig(), [art])
    assert before != after
    assert shipped.exists()

"""llmopt replaces only what it wrote, never an input, and convert owns and locks its work directory."""

import fcntl
import os

import pytest

from llmopt.paths import safe_join
from llmopt.errors import UserError
from llmopt.workdir import MARKER


def _tree(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*") if p.is_file())


def test_force_never_replaces_a_directory_llmopt_did_not_write(cli, tmp_path):
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = cli("load", "preset:tiny-llama", "-o", mine, "--force")
    assert r.code == 1 and "not an llmopt artifact" in r.err and "--force" not in r.err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_force_refuses_an_artifact_holding_a_foreign_file(cli, tiny_ckpt, tmp_path):
    out = tmp_path / "onnx"
    assert cli("export", tiny_ckpt, "-o", out).code == 0
    (out / "notes.txt").write_text("mine")
    r = cli("export", tiny_ckpt, "-o", out, "--force")
    assert r.code == 1 and "notes.txt" in r.err and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("cmd", [
    ["quantize", "{ckpt}", "-o", "{ckpt}"],
    ["export", "{ckpt}", "-o", "{ckpt}"],
    ["export", "{ckpt}", "-o", "{ckpt}/sub"],
    ["validate", "{onnx}", "-o", "{onnx}"],
    ["export", "{ckpt}", "-o", "{parent}"],
])
def test_output_overlapping_an_input_is_refused(cli, tiny_ckpt, tiny_onnx, cmd):
    before = _tree(tiny_ckpt.parent), _tree(tiny_onnx)
    args = [a.format(ckpt=tiny_ckpt, onnx=tiny_onnx, parent=tiny_ckpt.parent) for a in cmd]
    r = cli(*args)
    assert r.code == 1 and "output" in r.err and "Traceback" not in r.err, r.err
    assert (_tree(tiny_ckpt.parent), _tree(tiny_onnx)) == before


def test_output_that_is_a_file(cli, tiny_ckpt, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("export", tiny_ckpt, "-o", f)
    assert r.code == 1 and "is a file" in r.err and f.read_text() == "x"


def _recipe(tmp_path, name="w", extra=""):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: {name}\nmodel: {{source: 'preset:tiny-llama'}}\n{extra}")
    return p


def test_convert_refuses_a_foreign_workdir_and_keeps_its_files(cli, tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "recipe.resolved.yaml").write_text("my own file")
    r = cli("convert", _recipe(tmp_path), "-w", wd)
    assert r.code == 1 and "not an llmopt work directory" in r.err
    assert (wd / "recipe.resolved.yaml").read_text() == "my own file"


def test_convert_workdir_is_locked(cli, tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / MARKER).write_text("{}")
    fd = os.open(wd / MARKER, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running convert holds it
    try:
        r = cli("convert", _recipe(tmp_path), "-w", wd)
    finally:
        os.close(fd)
    assert r.code == 1 and "another llmopt convert is running" in r.err
    assert sorted(p.name for p in wd.iterdir()) == [MARKER]


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/b", ".hidden", ""])
def test_recipe_name_cannot_leave_the_work_root(cli, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("convert", _recipe(tmp_path, repr(name)))
    assert r.code == 1 and "name" in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("extra, field", [
    ("validate: {eval_text: missing.txt}\n", "validate.eval_text"),
    ("quantize: {method: gptq, calibration: {text: nope.txt}}\n", "quantize.calibration.text"),
    ("build: {backend: tensorrt, device: cuda}\n", "build.backend"),
    ("envelope: {batch: [1, 1, 1], input_len: [1, 8, 16], total_len: [1, 64, 4096]}\n", "envelope.total_len"),
    # validate's prompts (up to 32 tokens) + its greedy tokens do not fit the engine's KV capacity
    ("envelope: {batch: [1, 1, 1], input_len: [1, 8, 16], total_len: [1, 16, 40]}\nvalidate: {decode_tokens: 8}\n",
     "envelope.total_len"),
])
def test_recipe_problems_are_found_before_the_first_stage(cli, tmp_path, extra, field):
    r = cli("convert", _recipe(tmp_path, extra=extra), "-w", tmp_path / "w")
    assert r.code == 1 and f"recipe {field}" in r.err, r.err
    assert not (tmp_path / "w").exists()


def test_workdir_inside_the_model_source_is_refused(cli, tiny_ckpt, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: x\nmodel: {{source: '{tiny_ckpt}'}}\n")
    r = cli("convert", p, "-w", tiny_ckpt / "work")
    assert r.code == 1 and "inside the model source" in r.err and not (tiny_ckpt / "work").exists()


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/../../b", "", 3, "a\\..\\b"])
def test_safe_join_refuses_names_that_leave_the_directory(tmp_path, name):
    with pytest.raises(UserError):
        safe_join(tmp_path, name)


def test_safe_join_refuses_a_symlink_out(tmp_path):
    (tmp_path / "d").mkdir()
    os.symlink("/etc", tmp_path / "d" / "link")
    with pytest.raises(UserError, match="symbolic link"):
        safe_join(tmp_path / "d", "link/passwd")
    assert safe_join(tmp_path / "d", "ok/model.safetensors") == tmp_path / "d" / "ok" / "model.safetensors"

from pathlib import Path

import pytest

from llmopt.errors import UserError
from llmopt.recipe import Recipe, dump_recipe, load_recipe


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_minimal_recipe_fills_defaults_and_resolves_paths(tmp_path):
    r = load_recipe(write(tmp_path, "name: x\nmodel: {source: ckpt}\nvalidate: {eval_text: e.txt}\n"))
    assert r.model.source == str((tmp_path / "ckpt").resolve())
    assert r.validate_.eval_text == (tmp_path / "e.txt").resolve()
    assert r.export.opset == 23 and r.build.backend == "onnxruntime"
    assert r.envelope.input_len == (1, 128, 1024)


def test_typo_names_field_and_allowed_names(tmp_path):
    with pytest.raises(UserError) as exc:
        load_recipe(write(tmp_path, "model: {source: preset:tiny-llama}\nexport: {opsett: 23}\n"))
    msg = str(exc.value)
    assert "export.opsett: unknown field" in msg
    assert "allowed: dtype, opset" in msg


def test_every_bad_field_gets_its_own_line(tmp_path):
    with pytest.raises(UserError) as exc:
        load_recipe(write(tmp_path, "model: {source: preset:x}\nbuild: {backend: tensorrtt}\n"
                                    "quantize: {method: rtn, bits: 3}\nnme: y\n"))
    lines = exc.value.lines
    assert any(l.startswith("• build.backend:") for l in lines)
    assert any(l.startswith("• quantize.bits:") for l in lines)
    assert any("nme: unknown field" in l and "envelope" in l for l in lines)


def test_set_overrides_and_round_trip(tmp_path):
    p = write(tmp_path, "name: x\nmodel: {source: preset:tiny-llama}\nquantize: {method: rtn, bits: 4}\n")
    r = load_recipe(p, ["quantize.bits=8", "quantize.group_size=null", "export.opset=21"])
    assert r.quantize.bits == 8 and r.quantize.group_size is None and r.export.opset == 21
    again = load_recipe(write(tmp_path, dump_recipe(r)))
    assert again == r


def test_envelope_order_is_checked(tmp_path):
    with pytest.raises(UserError, match="envelope: input_len must satisfy"):
        load_recipe(write(tmp_path, "model: {source: preset:x}\nenvelope: {input_len: [1, 512, 128]}\n"))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="YAML mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_recipe(write(tmp_path, "model: {source: [\n"))
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_shipped_recipes_validate():
    root = Path(__file__).resolve().parent.parent / "recipes"
    recipes = sorted(root.glob("*.yaml"))
    assert recipes, "recipes/ is empty"
    for p in recipes:
        assert isinstance(load_recipe(p), Recipe), p


def test_stage_errors_under_convert_name_recipe_fields_not_flags(cli, tmp_path, monkeypatch):
    """A stage's hint says `pass --eval-text FILE` in its own subcommand; under convert the same problem is
    in the recipe, so the line names the recipe field."""
    import llmopt.convert
    from llmopt.errors import UserError
    from llmopt.recipe_terms import in_recipe_terms

    def failing_stage(*args, **kwargs):
        raise UserError("e.txt: eval text not found", "pass --eval-text FILE")

    monkeypatch.setattr(llmopt.convert, "run_stage", failing_stage)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {source: 'preset:tiny-llama'}\n")
    r = cli("convert", recipe, "-w", tmp_path / "w")
    assert r.code == 1 and "Traceback" not in r.err
    line = r.err.strip().splitlines()[-1]
    assert "validate.eval_text" in line and "--eval-text" not in line and "--set" in line, line

    cap = in_recipe_terms(UserError("context of 300 tokens exceeds this engine's KV capacity of 128",
                                    "rebuild with a larger envelope total_len max (llmopt build --total-len MIN,OPT,MAX)"))
    assert "envelope.total_len" in cap.hint and "llmopt build" not in cap.hint and "MIN,OPT,MAX" not in cap.hint
    assert str(in_recipe_terms(UserError("--seq-len 4096 exceeds the model's 2048 positions"))).startswith(
        "quantize.calibration.seq_len 4096")
    keep = UserError("out of memory", "free memory, or pass --force to try anyway")  # convert's own flag
    assert in_recipe_terms(keep) is keep

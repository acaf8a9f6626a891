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

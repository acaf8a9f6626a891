"""Property fuzz of the parsers that read user files: a recipe or a manifest of any shape gives a valid
object or a UserError, never another exception (which would be a traceback and exit 70)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmopt.artifact import open_artifact
from llmopt.errors import UserError
from llmopt.recipe import Recipe, load_recipe
from llmopt.verify import verify

FIELDS = ["name", "model", "source", "dtype", "quantize", "method", "bits", "group_size", "export", "opset",
          "envelope", "batch", "input_len", "total_len", "build", "backend", "validate", "gates", "eval_text",
          "calibration", "text", "kv_cache", "files", "inputs", "key", "kind", "stage", "bytes", "sha256", "path",
          "schema_version", "../x", "", "none"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(FIELDS + ["preset:tiny-llama", "float32", "gptq", "none"]))
trees = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.sampled_from(FIELDS), kids, max_size=5)),
                     max_leaves=30)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _recipe_outcome(path: Path, overrides: list[str] | None = None) -> None:
    try:
        assert isinstance(load_recipe(path, overrides or []), Recipe)
    except UserError:
        pass


@FUZZ
@given(raw=st.binary(max_size=400))
def test_recipe_bytes(raw):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_bytes(raw)
        _recipe_outcome(p)


@FUZZ
@given(tree=trees, overrides=st.lists(st.text(max_size=24), max_size=3))
def test_recipe_structures_and_overrides(tree, overrides):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_text(yaml.safe_dump(tree))
        _recipe_outcome(p, overrides)


@FUZZ
@given(tree=trees, base=st.fixed_dictionaries({"schema_version": st.just(1), "key": st.text(max_size=8),
                                               "kind": st.sampled_from(["onnx", "engine", "checkpoint", "x"]),
                                               "stage": st.sampled_from(["export", "build", "load"])}))
def test_manifest_structures(tree, base):
    with tempfile.TemporaryDirectory() as d:
        art = Path(d) / "a"
        art.mkdir()
        (art / "model.onnx").write_bytes(b"x")
        manifest = dict(base)
        if isinstance(tree, dict):
            manifest.update(tree)
        manifest.setdefault("files", tree if not isinstance(tree, dict) else {})
        (art / "manifest.json").write_text(json.dumps(manifest, default=str))
        for fn in (open_artifact, verify):
            try:
                fn(art)
            except UserError:
                pass

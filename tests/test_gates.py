"""Default gates: one table in code and docs, rows chosen from what the artifact is."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from llmopt.gates import DEFAULT_GATES, default_gates, effective_gates, markdown_table, profile_of
from llmopt.recipe import Gates

ROOT = Path(__file__).resolve().parent.parent


def art(stage, config=None, metadata=None):
    return SimpleNamespace(stage=stage, config=config or {}, metadata=metadata or {})


def test_docs_show_exactly_the_table_in_code():
    assert markdown_table() in (ROOT / "docs" / "validate.md").read_text()


def test_profile_from_lineage():
    fp32 = [art("build", {"kv_cache": "float", "quantize_lm_head": "none"}), art("export", {"dtype": "float32"}),
            art("load")]
    assert profile_of(fp32) == {"weights": "fp32", "kv_cache": "float", "lm_head": "none"}
    assert profile_of([art("export", {"dtype": "float16"}), art("load")])["weights"] == "fp16"
    q4 = [art("build", {"kv_cache": "int8", "quantize_lm_head": "int4"}), art("export", {"dtype": "float32"}),
          art("quantize", {"bits": 4, "method": "gptq"}, {"scheme": {"bits": 4, "method": "gptq"}}), art("load")]
    assert profile_of(q4) == {"weights": "int4", "kv_cache": "int8", "lm_head": "int4"}
    sq = [art("export"), art("quantize", {"bits": 8, "method": "smoothquant"}), art("load")]
    assert profile_of(sq)["weights"] == "w8a8"
    assert profile_of([art("export"), art("quantize", {"bits": 8, "method": "rtn"})])["weights"] == "int8"


def test_modifiers_only_loosen():
    base = DEFAULT_GATES["int4"]
    mod = default_gates({"weights": "int4", "kv_cache": "int8", "lm_head": "int4"})
    for name, value in base.items():
        assert (mod[name] <= value) if name.startswith("min_") else (mod[name] >= value)
    assert mod["min_top1_agreement"] < base["min_top1_agreement"]


def test_recipe_overrides_single_gates_and_none_disables():
    profile = {"weights": "fp32", "kv_cache": "float", "lm_head": "none"}
    gates, source = effective_gates(Gates(max_kl=0.5), profile)
    assert gates.max_kl == 0.5 and gates.min_top1_agreement == DEFAULT_GATES["fp32"]["min_top1_agreement"]
    assert "overridden: max_kl" in source
    off, source = effective_gates("none", profile)
    assert all(v is None for v in off.model_dump().values()) and source.startswith("none")


def test_validate_fits_its_shapes_into_the_engine_context(tmp_path):
    """An engine with a fixed KV capacity below validate's 256-token windows: the windows and the latency
    prompt shrink to fit; prompts + generated tokens that cannot fit are refused before any model runs."""
    import json

    from llmopt.artifact import Artifact
    from llmopt.errors import UserError
    from llmopt.stages.validate import check_fits, context_limits

    (tmp_path / "io.json").write_text(json.dumps({"kv_capacity": 128}))
    eng = Artifact(tmp_path, {"kind": "engine", "stage": "build", "metadata": {"backend": "onnxruntime"}, "config": {}})
    assert context_limits(eng) == (128, 128)
    check_fits(128, [[1] * 32], 4, "e", "hint")
    with pytest.raises(UserError, match="needs 48 tokens"):
        check_fits(40, [[1] * 32], 4, "e", "hint")
    (tmp_path / "io.json").write_text(json.dumps({}))
    trt = Artifact(tmp_path, {"kind": "engine", "stage": "build", "metadata": {"backend": "tensorrt"},
                              "config": {"envelope": {"input_len": [1, 64, 200], "total_len": [1, 128, 300]}}})
    assert context_limits(trt) == (200, 300)
    ort = Artifact(tmp_path, {"kind": "onnx", "stage": "export", "metadata": {}, "config": {}})
    assert context_limits(ort) == (None, None)

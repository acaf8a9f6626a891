"""ONNX Runtime GenAI runs llmopt's ONNX Runtime engines as they are (its own tokenizer, config and
KV-cache handling) and its greedy tokens equal `llmopt generate`'s: fp32, int4 and the int8 KV cache.

GenAI lives in its own virtualenv (genai_env.py), created from PyPI on first use. When it cannot be
created, the test fails (it does not skip): CI must show that the check did not run.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from genai_env import genai_python

from llmopt.models import presets
from llmopt.runtime import assets

HERE = Path(__file__).resolve().parent
NEW_TOKENS = 40


def _prompts() -> list[str]:
    text = presets.DEFAULT_EVAL_TEXT.read_text()
    words = text.split()
    return [" ".join(words[i:i + n]) for i, n in ((0, 6), (200, 17), (1000, 30))]


@pytest.fixture(scope="module")
def genai_py() -> Path:
    py, why = genai_python()
    if py is None:
        pytest.fail(f"could not create the ONNX Runtime GenAI virtualenv: {why}", pytrace=False)
    return py


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a file?"}]


def _genai(py: Path, engine: Path, prompts: list[str]) -> dict:
    r = subprocess.run([str(py), str(HERE / "genai_greedy.py"), str(engine),
                        json.dumps({"prompts": prompts, "new_tokens": NEW_TOKENS, "chat": CHAT})],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"GenAI failed on {engine.name}: {r.stderr.strip()[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fp32_engine", "int4_engine", "kv8_engine"])
def test_genai_greedy_equals_llmopt(engine, request, genai_py, cli):
    path = request.getfixturevalue(engine)
    prompts = _prompts()
    got = _genai(genai_py, path, prompts)
    tokenizer = assets.from_dir(path)
    # GenAI reads the engine's chat template (chat_template.jinja) and renders it as transformers does
    assert got["chat"] == tokenizer.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert got["genai"].startswith("0.")
    for text, g in zip(prompts, got["results"]):
        r = cli("generate", path, "--prompt", text, "--max-new-tokens", NEW_TOKENS, "--temperature", "0", "--json")
        assert r.code == 0, r.err
        ours = r.json()
        assert g["prompt_ids"] == tokenizer.prompt(text)  # GenAI's tokenizer reads the engine's files alike
        mine = ours["token_ids"]
        if ours["finish_reason"] == "stop":  # GenAI's sequence ends before the eos token it stopped at
            assert mine[-1] in ours["eos_ids"]
            mine = mine[:-1]
        else:
            assert len(mine) == NEW_TOKENS
        assert g["tokens"] == mine, f"{engine}: GenAI and llmopt differ for {text!r}"

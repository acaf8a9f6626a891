"""Request bodies and prompts without a server: strict fields, neutral-only OpenAI extras, chat templates."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmopt.models.loader import load_tokenizer
from llmopt.models.presets import TINY_TRAINED
from llmopt.serve.app import ApiError
from llmopt.serve.routes import chat_prompt
from llmopt.serve.schemas import ChatRequest, CompletionRequest


def test_sampling_params_from_body():
    body = CompletionRequest(model="m", prompt="x", temperature=0.5, top_p=0.9, top_k=5, seed=3, stop="\n")
    p = body.sampling()
    assert (p.temperature, p.top_p, p.top_k, p.seed) == (0.5, 0.9, 5, 3) and body.stops == ["\n"]
    assert CompletionRequest(model="m", prompt="x", temperature=0).sampling().greedy


@pytest.mark.parametrize("extra", [{"frobnicate": 1}, {"temperature": -0.1}, {"top_p": 1.5}, {"n": 2},
                                   {"frequency_penalty": 1.0}, {"logprobs": 3}, {"stop": [""]}])
def test_rejected(extra):
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", **extra)


def test_chat_template_or_a_clear_400():
    class Engine:  # what chat_prompt reads from a ServedEngine
        name = "tiny"
        tokenizer = load_tokenizer(TINY_TRAINED)
        chat_template = False

    body = ChatRequest(model="tiny", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ApiError) as e:
        chat_prompt(Engine, body)
    assert e.value.status == 400 and "no chat template" in e.value.message
    Engine.tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    Engine.chat_template = True
    parts = ChatRequest(model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert chat_prompt(Engine, parts) == chat_prompt(Engine, body) == Engine.tokenizer("[user] hi\n")["input_ids"]

"""The shared generation loop with text on top: eos ids, stop strings, streaming, seeds, finish reasons,
on the trained preset through the PyTorch session (the loop is the same object for every backend)."""

from __future__ import annotations

import pytest

from llmopt.models import presets
from llmopt.models.loader import load_model
from llmopt.runtime.generate import complete, greedy, run_loop
from llmopt.runtime.sampling import Sampler, SamplingParams
from llmopt.runtime.torch_session import TorchSession

PROMPT = "The function returns"


@pytest.fixture(scope="module")
def model_tok():
    model, tok = load_model(presets.TINY_TRAINED)
    return TorchSession(model), tok


def _ids(tok, text=PROMPT):
    return [tok(text)["input_ids"]]


def test_greedy_length_and_stream(model_tok):
    s, tok = model_tok
    ref = greedy(s, _ids(tok), 24).tokens[0].tolist()
    pieces = []
    out = complete(s, tok, _ids(tok), 24, on_text=lambda r, p: pieces.append(p))
    c = out.completions[0]
    assert c.token_ids == ref and c.finish_reason == "length"
    assert "".join(pieces) == c.text == tok.decode(ref)
    t = out.timings()
    assert t["generated_tokens"] == 24 and t["time_to_first_token_ms"] > 0 and t["decode_tokens_per_s"] > 0


def test_every_eos_id_stops(model_tok):
    s, tok = model_tok
    ref = greedy(s, _ids(tok), 24).tokens[0].tolist()
    k = next(i for i in range(3, 24) if ref[i] not in ref[:i])  # a token seen first at step k
    for eos in ([ref[k]], [123456, ref[k]]):
        c = complete(s, tok, _ids(tok), 24, eos_ids=eos).completions[0]
        assert c.token_ids == ref[:k + 1] and c.finish_reason == "stop"
        assert c.text == tok.decode(ref[:k])


def test_stop_string_cuts_text(model_tok):
    s, tok = model_tok
    full = complete(s, tok, _ids(tok), 32).completions[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    c = complete(s, tok, _ids(tok), 32, stop=[stop]).completions[0]
    assert c.finish_reason == "stop" and c.text == full[:full.index(stop)]
    assert len(c.token_ids) < 32


def test_seed_gives_the_same_text(model_tok):
    s, tok = model_tok
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    a = complete(s, tok, _ids(tok), 24, p).completions[0]
    b = complete(s, tok, _ids(tok), 24, p).completions[0]
    other = complete(s, tok, _ids(tok), 24, SamplingParams(temperature=1.0, top_p=0.95, seed=8)).completions[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert other.token_ids != a.token_ids
    # row 0 of a batch draws as the prompt alone does
    batch = complete(s, tok, _ids(tok) + _ids(tok, "A list of"), 24, p).completions
    assert batch[0].token_ids == a.token_ids


def test_samplers_and_finished_rows(model_tok):
    s, tok = model_tok
    prompts = _ids(tok) + _ids(tok, "Each line")
    steps = []

    def on_step(tokens):
        steps.append(tokens.tolist())
        return [len(steps) >= 3, len(steps) >= 5]  # row 0 done after 3 tokens, row 1 after 5

    g = run_loop(s, prompts, 20, [Sampler(), Sampler()], on_step)
    assert g.tokens.shape == (2, 5) and len(steps) == 5
    assert g.tokens[0, :3].tolist() == greedy(s, prompts, 3).tokens[0].tolist()

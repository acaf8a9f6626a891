"""Incremental detokenization and stops, on the shipped tiny-trained tokenizer (byte-level BPE)."""

from __future__ import annotations

import pytest

from llmopt.models import presets
from llmopt.models.loader import load_tokenizer
from llmopt.runtime.textstream import TextStream


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer(presets.TINY_TRAINED)
    assert t is not None
    return t


def _stream(tok, text: str, **kw) -> tuple[TextStream, list[str]]:
    s = TextStream(tok, **kw)
    pieces = []
    for i in tok(text)["input_ids"]:
        if s.finished:
            break
        pieces.append(s.feed(i))
    if not s.finished:
        pieces.append(s.finish("length"))
    return s, pieces


@pytest.mark.parametrize("text", ["The quick brown fox jumps over the lazy dog.",
                                  "naïve café — 🙂 über straße 日本語", "  spaces\n\nand\tnewlines  "])
def test_pieces_join_to_the_full_decode(tok, text):
    ids = tok(text)["input_ids"]
    s, pieces = _stream(tok, text)
    assert "".join(pieces) == tok.decode(ids) == s.text
    assert s.finish_reason == "length" and s.token_ids == ids
    assert not any("\ufffd" in p for p in pieces)  # a split UTF-8 character is never printed half


def test_multibyte_character_waits_for_its_last_byte(tok):
    ids = tok("🙂")["input_ids"]
    assert len(ids) > 1  # the emoji's bytes are several tokens in this vocabulary
    s = TextStream(tok)
    assert [s.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert s.feed(ids[-1]) == "🙂"


def test_stop_string_across_tokens_cuts_before_it(tok):
    text = "Answer: Paris.\nUser: and Spain?"
    stop = "\nUser:"
    s, pieces = _stream(tok, text, stop=[stop])
    assert s.finish_reason == "stop" and s.stop_hit == stop
    assert "".join(pieces) == s.text == "Answer: Paris."
    assert len(s.token_ids) < len(tok(text)["input_ids"])  # it stopped at the token that completed the stop
    assert all(stop not in p for p in pieces)


def test_partial_stop_is_held_then_released(tok):
    s, pieces = _stream(tok, "one two thr", stop=["three"])
    assert s.finish_reason == "length"
    assert "".join(pieces) == "one two thr"
    assert "thr" not in "".join(pieces[:-1])  # held back until finish: it could have become "three"


def test_earliest_of_several_stops_wins(tok):
    s, _ = _stream(tok, "alpha beta gamma delta", stop=["delta", "beta"])
    assert s.stop_hit == "beta" and s.text == "alpha "


def test_eos_id_finishes_without_text(tok):
    ids = tok("hello world")["input_ids"]
    s = TextStream(tok, eos_ids=[tok.eos_token_id])
    out = "".join(s.feed(i) for i in ids)
    assert s.feed(tok.eos_token_id) == "" and s.finished and s.finish_reason == "stop"
    assert out == tok.decode(ids) and s.token_ids[-1] == tok.eos_token_id
    with pytest.raises(RuntimeError):
        s.feed(ids[0])


def test_context_gives_the_first_piece_its_spacing(tok):
    prompt = tok("The capital of France is")["input_ids"]
    gen = tok("The capital of France is Paris")["input_ids"][len(prompt):]
    s = TextStream(tok, context=prompt)
    out = "".join(s.feed(i) for i in gen) + s.finish("length")
    assert out == tok.decode(prompt + gen)[len(tok.decode(prompt)):]

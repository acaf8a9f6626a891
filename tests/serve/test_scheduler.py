"""The continuous-batching scheduler without HTTP: chunked and batched prefill, sequences joining and
leaving a shared KV buffer, and the one-at-a-time fallback, each equal to the plain generation loop."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from llmopt.artifact import open_artifact
from llmopt.errors import UserError
from llmopt.models.loader import load_tokenizer
from llmopt.models.presets import TINY_TRAINED
from llmopt.runtime.generate import greedy
from llmopt.runtime.open import open_session
from llmopt.runtime.sampling import SamplingParams
from llmopt.serve.metrics import Metrics
from llmopt.serve.scheduler import Event, Request, Scheduler
from llmopt.serve.slots import GqaSlots, SingleSlot, open_slots

LENGTHS = [5, 40, 17, 3, 33, 9, 60, 2]   # > chunk: prefilled over several steps; short ones share a budget


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(2, vocab, n).tolist() for n in LENGTHS]


def _serve_all(slots, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[list[int]], Metrics]:
    metrics = Metrics()
    sched = Scheduler(slots, load_tokenizer(TINY_TRAINED), eos_ids=[], metrics=metrics)
    done: dict[int, Event] = {}
    finished = threading.Event()

    def emit_for(i: int):  # noqa: ANN202
        def emit(ev: Event) -> None:
            if ev.finish_reason:
                done[i] = ev
                if len(done) == len(prompts):
                    finished.set()
        return emit

    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        sched.submit(Request(p, SamplingParams(), n, [], emit_for(i)))
    sched.start()
    assert finished.wait(120), f"only {len(done)} of {len(prompts)} finished"
    sched.stop()
    assert all(ev.error is None and ev.finish_reason == "length" for ev in done.values())
    return [done[i].token_ids for i in range(len(prompts))], metrics


def _one_at_a_time(artifact, prompts, max_tokens) -> list[list[int]]:
    session = open_session(artifact)
    return [greedy(session, [p], n).tokens[0].tolist() for p, n in zip(prompts, max_tokens)]


@pytest.mark.parametrize("batched_prefill", [False, True], ids=["prompt-per-call", "padded-group"])
def test_gqa_slots_batched_equals_one_at_a_time(serve_engine, batched_prefill):
    art = open_artifact(serve_engine)
    slots = GqaSlots(open_session(art), max_batch=3, chunk=16, batched_prefill=batched_prefill)
    prompts = _prompts(slots.vocab_size)
    max_tokens = [8 + 3 * i for i in range(len(prompts))]
    got, metrics = _serve_all(slots, prompts, max_tokens)
    assert got == _one_at_a_time(art, prompts, max_tokens)
    rows, steps = (metrics.registry.get_sample_value(f"llmopt_decode_batch_size_{s}") for s in ("sum", "count"))
    assert rows / steps > 1.5  # really decoded together


def test_standard_attention_serves_one_at_a_time(serve_engine):
    art = open_artifact(serve_engine.parent / "onnx")  # the export itself: standard attention
    slots = open_slots(open_session(art), None, {})
    assert isinstance(slots, SingleSlot) and slots.max_batch == 1
    prompts = _prompts(slots.vocab_size)[:4]
    got, _ = _serve_all(slots, prompts, [6, 9, 4, 7])
    assert got == _one_at_a_time(art, prompts, [6, 9, 4, 7])
    with pytest.raises(UserError, match="one sequence at a time"):
        open_slots(open_session(art), 4, {})


def test_kv_moves_keep_other_slots(serve_engine):
    """A slot moved down carries its cache: the next decode gives what it gave in the old slot."""
    art = open_artifact(serve_engine)
    slots = GqaSlots(open_session(art), max_batch=3)
    rng = np.random.default_rng(2)
    a, b = rng.integers(2, slots.vocab_size, 11).tolist(), rng.integers(2, slots.vocab_size, 7).tolist()
    slots.run(0, [a], [0])
    slots.run(2, [b], [0])
    want = slots.run(2, [[5]], [7])
    slots.run(2, [b], [0])  # restore slot 2's state before the extra token
    slots.move(2, 1, 7)
    got = slots.run(0, [[4], [5]], [11, 7])
    np.testing.assert_array_equal(got[1], want[0])


def test_prefill_budget_gives_each_prompt_its_first_token_from_its_own_call(serve_engine):
    """On a CPU engine short prompts are prefilled one call each, several per iteration up to the chunk
    budget, and each sequence's first token comes from its own call, before the iteration's decode step."""
    art = open_artifact(serve_engine)
    slots = GqaSlots(open_session(art), max_batch=4, chunk=32)
    assert not slots.batched_prefill  # the CPU default
    calls: list[tuple[int, int, int]] = []
    run = slots.run

    def recording_run(first, rows, past):  # noqa: ANN001, ANN202
        calls.append((first, len(rows), max(len(r) for r in rows)))
        return run(first, rows, past)

    slots.run = recording_run
    rng = np.random.default_rng(3)
    prompts = [rng.integers(2, slots.vocab_size, 10).tolist() for _ in range(4)]
    got, _ = _serve_all(slots, prompts, [3] * 4)
    assert got == _one_at_a_time(art, prompts, [3] * 4)
    # 4 prompts of 10 tokens, budget 32: three single-row prefills and 2 tokens of the fourth, the decode
    # step of the three prefilled, then the fourth's last 8 tokens
    assert calls[:6] == [(0, 1, 10), (1, 1, 10), (2, 1, 10), (3, 1, 2), (0, 3, 1), (3, 1, 8)], calls[:6]

"""The one generation loop every backend runs (torch, ONNX Runtime, TensorRT sessions), for `generate`,
`validate` and `bench`: batched, left-padded, each row's next token chosen by its own ``Sampler``
(greedy when none is given), stopping when every row is done or at ``max_new_tokens``.

``complete`` adds text on top: prompts as token ids in, per row a ``TextStream`` (incremental text,
stop strings, eos ids) and the finish reason out, with the timings a user asks for (time to first token,
tokens per second).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from llmopt.runtime.base import DecoderSession
from llmopt.runtime.sampling import Sampler, SamplingParams
from llmopt.runtime.textstream import TextStream


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@dataclass
class Generation:
    tokens: np.ndarray                      # [batch, steps] (a finished row repeats nothing new: see `done`)
    prefill_s: float                        # prompt run + first token choice (time to first token)
    step_s: list[float] = field(default_factory=list)  # one per decode step (model run + choice)

    @property
    def decode_ms_median(self) -> float:
        return float(np.median(self.step_s) * 1e3) if self.step_s else float("nan")

    @property
    def decode_ms_p90(self) -> float:
        return float(np.percentile(self.step_s, 90) * 1e3) if self.step_s else float("nan")


StepHook = Callable[[np.ndarray], Iterable[bool] | None]


def run_loop(session: DecoderSession, prompts: list[list[int]], max_new_tokens: int,
             samplers: list[Sampler] | None = None, on_step: StepHook | None = None, pad_id: int = 0) -> Generation:
    """Prefill, then decode until ``max_new_tokens`` or until ``on_step`` says every row is done.

    ``samplers``: one per row (None: greedy argmax for all rows). ``on_step(tokens [batch])`` sees each
    step's chosen tokens and returns which rows are finished (None: none). A finished row keeps its
    place in the batch and is fed its last token; its later tokens are not reported again.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    ids, mask = left_pad(prompts, pad_id)
    history = [list(p) for p in prompts]

    def choose(logits: np.ndarray) -> np.ndarray:
        last = logits[:, -1, :]
        if samplers is None:
            return last.argmax(-1)
        out = np.array([s(last[r], history[r]) for r, s in enumerate(samplers)], np.int64)
        for r, t in enumerate(out):
            history[r].append(int(t))
        return out

    finished = np.zeros(len(prompts), bool)

    def report(tokens: np.ndarray) -> None:
        if on_step is not None:
            done = on_step(tokens)
            if done is not None:
                finished[:] |= np.fromiter(done, bool, count=len(prompts))

    t0 = time.perf_counter()
    nxt = choose(session.prefill(ids, mask, last_only=True))
    prefill_s = time.perf_counter() - t0
    out, steps = [nxt], []
    report(nxt)
    while len(out) < max_new_tokens and not finished.all():
        t = time.perf_counter()
        nxt = choose(session.decode(nxt))
        steps.append(time.perf_counter() - t)
        out.append(nxt)
        report(nxt)
    return Generation(np.stack(out, axis=1), prefill_s, steps)


def greedy(session: DecoderSession, prompts: list[list[int]], new_tokens: int, pad_id: int = 0) -> Generation:
    """Exactly ``new_tokens`` greedy tokens per row (validate, bench)."""
    return run_loop(session, prompts, new_tokens, pad_id=pad_id)


@dataclass
class Completion:
    text: str
    token_ids: list[int]        # generated ids, the one that ended the completion (eos / stop) included
    finish_reason: str          # "stop" (eos id or stop string) | "length"
    prompt_tokens: int


@dataclass
class Completions:
    completions: list[Completion]
    generation: Generation

    def timings(self) -> dict:
        g = self.generation
        n = sum(len(c.token_ids) for c in self.completions)
        decode_s = float(sum(g.step_s))
        return {"time_to_first_token_ms": g.prefill_s * 1e3,
                "decode_tokens_per_s": len(g.step_s) / decode_s if decode_s else None,  # per sequence
                "tokens_per_s": n / (g.prefill_s + decode_s) if n else None,
                "decode_ms_median": g.decode_ms_median if g.step_s else None,
                "total_s": g.prefill_s + decode_s, "generated_tokens": n}


def complete(session: DecoderSession, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
             params: SamplingParams = SamplingParams(), stop: Iterable[str] = (), eos_ids: Iterable[int] = (),
             on_text: Callable[[int, str], None] | None = None, pad_id: int = 0) -> Completions:
    """Generate text for each prompt; ``on_text(row, piece)`` receives text as it becomes printable.

    Every row gets its own sampler; with a seed, row r draws from ``seed + r`` so a batch of one
    prompt reproduces ``generate`` of that prompt alone."""
    stop = list(stop)
    eos = list(eos_ids)
    streams = [TextStream(tokenizer, stop=stop, eos_ids=eos, context=p) for p in prompts]
    samplers = None
    if not params.greedy or params.repetition_penalty != 1.0:
        samplers = [Sampler(params if params.seed is None else replace(params, seed=params.seed + r))
                    for r in range(len(prompts))]

    def on_step(tokens: np.ndarray) -> list[bool]:
        for r, (s, t) in enumerate(zip(streams, tokens)):
            if not s.finished:
                piece = s.feed(int(t))
                if piece and on_text is not None:
                    on_text(r, piece)
        return [s.finished for s in streams]

    g = run_loop(session, prompts, max_new_tokens, samplers, on_step, pad_id)
    for r, s in enumerate(streams):
        if not s.finished:
            tail = s.finish("length")
            if tail and on_text is not None:
                on_text(r, tail)
    done = [Completion(s.text, list(s.token_ids), s.finish_reason or "length", len(p)) for s, p in zip(streams, prompts)]
    return Completions(done, g)


def first_divergence(a: np.ndarray, b: np.ndarray) -> list[int | None]:
    """Per row: index of the first differing token, None when identical."""
    res: list[int | None] = []
    for ra, rb in zip(a, b):
        diff = np.nonzero(ra != rb)[0]
        res.append(int(diff[0]) if diff.size else None)
    return res

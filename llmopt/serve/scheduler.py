"""Continuous batching: one thread owns the engine's KV slots and steps every running sequence together.

Each loop iteration (1) drops cancelled sequences and compacts the survivors into slots 0..n-1, (2)
prefills waiting prompts, first come first served, up to a budget of ``slots.chunk`` prompt tokens — a long
prompt one chunk per iteration, short ones one call each so that each gets its first token as soon as its
own call ends (where ``slots.batched_prefill``, several short prompts share one padded call instead) — and
(3) runs one decode step for all n running sequences, each at its own cache length. A request joins between
decode steps and leaves when it finishes, so prompts delay the running sequences by at most one budget of
prefill per step.

Tokens are chosen by ``llmopt.runtime.sampling.Sampler`` (one per sequence, its own seeded generator)
and turned into text, with stop strings and eos, by ``llmopt.runtime.textstream.TextStream`` — the same
implementations `llmopt generate` uses, so the output for a seed does not depend on what else runs.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmopt.runtime.sampling import Sampler, SamplingParams
from llmopt.runtime.textstream import TextStream
from llmopt.serve.metrics import Metrics
from llmopt.serve.slots import Slots


class QueueFull(Exception):
    """The waiting queue is at its bound."""


class ShuttingDown(Exception):
    """The server is draining; no new work."""


@dataclass
class Event:
    """What a request's route receives: text made printable by one step, and the end of the sequence."""

    text: str
    finish_reason: str | None = None   # "stop" | "length" | "error" when finished
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    token_ids: list[int] | None = None  # every generated id, on the final event


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    emit: Callable[[Event], None]        # thread-safe delivery to the route
    ignore_eos: bool = False             # generate max_tokens whatever the model says (load tests)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Seq:
    req: Request
    sampler: Sampler
    stream: TextStream
    slot: int = -1
    cached: int = 0                      # tokens in this slot's KV cache
    todo: list[int] = field(default_factory=list)  # prompt tokens not yet prefilled
    generated: list[int] = field(default_factory=list)
    last_emit: float = 0.0

    @property
    def history(self) -> list[int]:
        return self.req.prompt + self.generated


class Scheduler:
    def __init__(self, slots: Slots, tokenizer: Any, eos_ids: list[int], metrics: Metrics,
                 max_queue: int = 64) -> None:
        self.slots = slots
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.metrics = metrics
        self.max_queue = max_queue
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []   # decoding; running[i].slot == i after each compaction
        self._group: list[_Seq] = []     # prefill in flight, slots len(running)..
        self._cond = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="llmopt-scheduler", daemon=True)
        self.steps = itertools.count()

    # -- called from the event loop ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        stream = TextStream(self.tokenizer, stop=req.stop, eos_ids=[] if req.ignore_eos else self.eos_ids,
                            context=req.prompt)
        seq = _Seq(req, Sampler(req.params), stream, todo=list(req.prompt))
        with self._cond:
            if not self._accepting:
                raise ShuttingDown()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull()
            self._waiting.append(seq)
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.prompt_tokens.inc(len(req.prompt))
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def load(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), "running": len(self._running) + len(self._group),
                "max_batch": self.slots.max_batch}

    # -- the scheduler thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running or self._group):
                    self._cond.wait()
                if self._stopping:
                    break
                self._drop_cancelled_waiting()
            try:
                self._iteration()
            except Exception:  # noqa: BLE001 - a bug in one step must not take the server down
                traceback.print_exc(file=sys.stderr)
                for seq in self._running + self._group:
                    self._finish(seq, "error", error="internal error while generating; see the server log")
                self._running, self._group = [], []
            self._update_gauges()
        for seq in [*self._waiting, *self._running, *self._group]:
            self._finish(seq, "error", error="server shut down")
        self.slots.close()

    def _iteration(self) -> None:
        self._compact()
        budget = self.slots.chunk or sys.maxsize  # prompt tokens this iteration may prefill
        while budget > 0:
            if not self._group:
                self._group = self._next_group()
            if not self._group:
                break
            budget -= self._prefill_step(budget)
        if self._running:
            self._decode_step()

    def _drop_cancelled_waiting(self) -> None:
        if any(s.req.cancelled.is_set() for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.req.cancelled.is_set())

    def _compact(self) -> None:
        """Free cancelled sequences' slots; survivors move down so the decode rows are 0..n-1."""
        gone = [s for s in self._running + self._group if s.req.cancelled.is_set()]
        if gone:
            self.metrics.cancelled.inc(len(gone))
            self._running = [s for s in self._running if not s.req.cancelled.is_set()]
            self._group = [s for s in self._group if not s.req.cancelled.is_set()]
        for i, s in enumerate(self._running + self._group):  # slots only ever move down: safe in order
            if s.slot != i:
                if s.cached:
                    self.slots.move(s.slot, i, s.cached)
                s.slot = i

    def _next_group(self) -> list[_Seq]:
        """New prompts for the free slots: one (prefilled in chunks), or several short ones in one call."""
        free = self.slots.max_batch - len(self._running)
        group: list[_Seq] = []
        with self._cond:
            while self._waiting and len(group) < free:
                seq = self._waiting[0]
                if group:
                    width = max(len(seq.todo), *(len(s.todo) for s in group))
                    if not self.slots.batched_prefill or width * (len(group) + 1) > (self.slots.chunk or 0):
                        break
                self._waiting.popleft()
                group.append(seq)
            self.metrics.queue_depth.set(len(self._waiting))
        for i, seq in enumerate(group):
            seq.slot = len(self._running) + i
        return group

    def _prefill_step(self, budget: int) -> int:
        """One prefill call for the group in flight (at most ``budget`` tokens of a single prompt); the
        prompt tokens it ran."""
        group, first = self._group, self._group[0].slot
        if len(group) == 1:
            seq = group[0]
            n = min(budget, len(seq.todo))
            logits = self.slots.run(first, [seq.todo[:n]], [seq.cached])
            seq.cached += n
            seq.todo = seq.todo[n:]
            if seq.todo:
                return n
            spent = n
        else:
            logits = self.slots.run(first, [s.todo for s in group], [0] * len(group))
            spent = max(len(s.todo) for s in group) * len(group)
            for s in group:
                s.cached, s.todo = len(s.todo), []
        self._group = []
        for seq, row in zip(group, logits):
            self._running.append(seq)
            self._accept(seq, row)
        self._running = [s for s in self._running if s.slot >= 0]
        return spent

    def _decode_step(self) -> None:
        rows = self._running
        t = time.perf_counter()
        logits = self.slots.run(0, [[s.generated[-1]] for s in rows], [s.cached for s in rows])
        self.metrics.decode_step.observe(time.perf_counter() - t)
        self.metrics.batch_size.observe(len(rows))
        for s in rows:
            s.cached += 1
        for seq, row in zip(rows, logits):
            self._accept(seq, row)
        self._running = [s for s in self._running if s.slot >= 0]

    def _accept(self, seq: _Seq, logits_row: np.ndarray) -> None:
        """Choose the next token, deliver its text; finish the sequence on eos, a stop string or length."""
        token = seq.sampler(logits_row, seq.history)
        seq.generated.append(token)
        now = time.perf_counter()
        if len(seq.generated) == 1:
            self.metrics.ttft.observe(now - seq.req.arrived)
        else:
            self.metrics.itl.observe(now - seq.last_emit)
        seq.last_emit = now
        self.metrics.generated_tokens.inc()
        text = seq.stream.feed(token)
        if seq.stream.finished:
            self._finish(seq, seq.stream.finish_reason or "stop", text)
        elif len(seq.generated) >= seq.req.max_tokens or seq.cached >= self.slots.capacity:
            self._finish(seq, "length", text + seq.stream.finish("length"))
        else:  # one event per token, even when its text is held back: clients see every token's timing
            self._deliver(seq, Event(text))

    def _finish(self, seq: _Seq, reason: str, text: str = "", error: str | None = None) -> None:
        seq.slot = -1  # leaves the batch; its slot is reused after the next compaction
        self._deliver(seq, Event(text, reason, prompt_tokens=len(seq.req.prompt),
                                 completion_tokens=len(seq.generated), error=error, token_ids=list(seq.generated)))

    def _deliver(self, seq: _Seq, event: Event) -> None:
        try:
            seq.req.emit(event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            seq.req.cancel()

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self._running) + len(self._group))
        self.metrics.queue_depth.set(len(self._waiting))

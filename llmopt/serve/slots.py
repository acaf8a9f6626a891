"""KV slots: the one place `serve` touches an engine session's cache.

A slot is one row of a KV cache that every running sequence shares. The scheduler asks for one
primitive, ``run(first, rows, past)``: append ``rows[i]`` to slot ``first + i``, whose cache already
holds ``past[i]`` tokens, and return the logits of each row's last new token.

* ``GqaSlots`` (an ``OrtGqaSession`` engine: GroupQueryAttention writes the cache in place) keeps one
  numpy buffer [max_batch, kv_heads, capacity, head_dim] per K/V tensor and binds, for each call, views
  of the contiguous rows it steps (zero-copy: ONNX Runtime reads and writes the numpy memory) on the
  session's binding, then calls the session's own step, ``OrtGqaSession.run_rows(ids, lengths)``, which
  owns the graph's length inputs (so an input change there needs nothing here). A prompt
  is prefilled into its own slot (in chunks) while the other slots keep their cache; a decode step runs
  rows 0..n-1 together, each at its own length (GroupQueryAttention derives each row's position from
  its length, which the graph reads from ``attention_mask``'s row sums).
* ``SingleSlot`` serves any other session (standard-attention ONNX, TensorRT, PyTorch) through the
  ``DecoderSession`` prefill/decode interface: one sequence at a time, so ``max_batch`` is 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from llmopt.errors import UserError
from llmopt.runtime.base import DecoderSession


class Slots(ABC):
    max_batch: int
    capacity: int             # tokens a sequence may hold (prompt + generated)
    vocab_size: int
    chunk: int | None         # prompt tokens per prefill call (None: the whole prompt at once)
    batched_prefill: bool     # several fresh prompts may be prefilled in one call

    @abstractmethod
    def run(self, first: int, rows: list[list[int]], past: list[int]) -> np.ndarray:
        """Append ``rows[i]`` to slot ``first + i`` (cache holding ``past[i]`` tokens); logits [n, vocab]
        of each row's last new token. Several rows with more than one token each must all start at 0."""

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of slot ``src`` into slot ``dst``."""
        raise NotImplementedError(f"{type(self).__name__} has one slot")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class GqaSlots(Slots):
    def __init__(self, session, max_batch: int, chunk: int = 256,  # noqa: ANN001 - OrtGqaSession
                 batched_prefill: bool | None = None) -> None:
        self.session = session
        # Several fresh prompts in one padded call pays off where a call has a fixed cost to share (a GPU).
        # On a CPU prefill is compute-bound: a group of k prompts costs k single calls, and every prompt in
        # it waits for the last one's first token.
        self.batched_prefill = session.device != "cpu" if batched_prefill is None else batched_prefill
        self.ort = session._ort
        d = session.dims
        self.max_batch = max_batch
        self.capacity = session.capacity
        self.vocab_size = d.vocab_size
        self.chunk = chunk
        shape = (max_batch, d.num_kv_heads, self.capacity, d.head_dim)
        self.kv = [np.zeros(shape, session.cache_dtype) for _ in session.past]
        self._views: dict[tuple[int, int], list] = {}

    def _bind_rows(self, first: int, n: int) -> None:
        views = self._views.get((first, n))
        if views is None:  # OrtValues over numpy views: ONNX Runtime works in the shared buffer itself
            views = [self.ort.OrtValue.ortvalue_from_numpy(a[first:first + n]) for a in self.kv]
            self._views[(first, n)] = views
        b = self.session.binding
        for past, present, ov in zip(self.session.past, self.session.present, views):
            b.bind_ortvalue_input(past, ov)
            b.bind_ortvalue_output(present, ov)

    def run(self, first: int, rows: list[list[int]], past: list[int]) -> np.ndarray:
        n, width = len(rows), max(len(r) for r in rows)
        if first < 0 or first + n > self.max_batch:
            raise ValueError(f"rows {first}..{first + n - 1} outside the {self.max_batch} slots")
        if n > 1 and width > 1 and any(past):
            raise ValueError("a multi-row prefill must start every row at cache position 0")
        new = np.array([len(r) for r in rows], np.int64)
        ids = np.zeros((n, width), np.int64)  # right-padded: each row's tokens from its own cache length
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        self._bind_rows(first, n)
        ends_last = bool((new == width).all())  # every row's last token in the last column: its logits alone
        logits = self.session.run_rows(ids, np.asarray(past, np.int64) + new, last_only=ends_last)
        return (logits[:, -1] if ends_last else logits[np.arange(n), new - 1]).astype(np.float32)

    def move(self, src: int, dst: int, length: int) -> None:
        for a in self.kv:
            a[dst, :, :length] = a[src, :, :length]


class SingleSlot(Slots):
    """Any DecoderSession, one sequence at a time (its session owns the one cache)."""

    max_batch = 1
    chunk = None
    batched_prefill = False

    def __init__(self, session: DecoderSession, capacity: int) -> None:
        self.session = session
        self.capacity = capacity
        self.vocab_size = session.dims.vocab_size

    def run(self, first: int, rows: list[list[int]], past: list[int]) -> np.ndarray:
        if first != 0 or len(rows) != 1:
            raise ValueError("SingleSlot runs one sequence in slot 0")
        (row,), (p,) = rows, past
        if p + len(row) > self.capacity:
            raise UserError(f"context of {p + len(row)} tokens exceeds this engine's capacity of {self.capacity}",
                            "send a shorter prompt or fewer max_tokens")
        if p == 0:
            return self.session.prefill(np.asarray([row], np.int64), last_only=True)[:, -1]
        if len(row) != 1:
            raise ValueError("SingleSlot appends one token at a time after the prompt")
        return self.session.decode(np.asarray(row, np.int64))[:, -1]

    def close(self) -> None:
        self.session.close()


def open_slots(session: DecoderSession, max_batch: int | None, envelope: dict, chunk: int = 256) -> Slots:
    """GqaSlots for a GroupQueryAttention engine, else one sequence at a time."""
    from llmopt.runtime.ort_session import OrtGqaSession

    total_max = int((envelope.get("total_len") or [0, 0, 2048])[2])
    if isinstance(session, OrtGqaSession):
        batch_max = int((envelope.get("batch") or [1, 1, 4])[2])
        return GqaSlots(session, max_batch or batch_max, chunk=chunk)
    if max_batch not in (None, 1):
        raise UserError(f"--max-batch {max_batch}: this engine ({session.backend}, standard attention) serves one "
                        "sequence at a time", "omit --max-batch, or build the engine with --attention gqa")
    return SingleSlot(session, capacity=total_max)

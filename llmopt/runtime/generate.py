"""The one generation loop every backend runs (greedy, fixed length, batched, left-padded)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from llmopt.runtime.base import DecoderSession


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
    tokens: np.ndarray                      # [batch, new_tokens]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)  # one per decode step

    @property
    def decode_ms_median(self) -> float:
        return float(np.median(self.step_s) * 1e3) if self.step_s else float("nan")

    @property
    def decode_ms_p90(self) -> float:
        return float(np.percentile(self.step_s, 90) * 1e3) if self.step_s else float("nan")


def greedy(session: DecoderSession, prompts: list[list[int]], new_tokens: int, pad_id: int = 0) -> Generation:
    ids, mask = left_pad(prompts, pad_id)
    t0 = time.perf_counter()
    logits = session.prefill(ids, mask)
    prefill_s = time.perf_counter() - t0
    nxt = logits[:, -1, :].argmax(-1)
    out = [nxt]
    steps = []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        logits = session.decode(nxt)
        steps.append(time.perf_counter() - t)
        nxt = logits[:, -1, :].argmax(-1)
        out.append(nxt)
    return Generation(np.stack(out, axis=1), prefill_s, steps)


def first_divergence(a: np.ndarray, b: np.ndarray) -> list[int | None]:
    """Per row: index of the first differing token, None when identical."""
    res: list[int | None] = []
    for ra, rb in zip(a, b):
        diff = np.nonzero(ra != rb)[0]
        res.append(int(diff[0]) if diff.size else None)
    return res

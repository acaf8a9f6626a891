"""Next-token choice, shared by every backend, `generate` and `serve`.

``SamplingParams`` says how; a ``Sampler`` applies it to one sequence, step by step, with its own random
generator: the same seed and the same logits give the same tokens whatever else shares the batch.
Order of operations (as in Hugging Face's logits processors): repetition penalty on the raw logits,
then temperature, top-k, top-p, and a draw from what is left. ``temperature == 0`` is greedy (argmax
after the penalty); top-k/top-p then change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0       # 0: greedy
    top_k: int = 0                 # 0: no limit
    top_p: float = 1.0             # 1: no nucleus cut
    repetition_penalty: float = 1.0  # 1: none; > 1 discourages tokens already in the history
    seed: int | None = None        # None: a fresh random seed

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            out.append(f"temperature {self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            out.append(f"top_k {self.top_k} must be >= 0 (0 is no limit)")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p {self.top_p} must be in (0, 1]")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            out.append(f"repetition_penalty {self.repetition_penalty} must be > 0 (1 is none)")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    """CTRL's penalty (as Hugging Face applies it): a seen token's logit is divided by ``penalty`` when
    positive, multiplied when negative. Returns a new array."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty != 1.0 and history:
        seen = np.unique(np.asarray(history, dtype=np.int64))
        vals = out[seen]
        out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """float64 probabilities after temperature, top-k and top-p (zeros outside the kept set, sums to 1)."""
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x[x < kth] = -np.inf
    x -= x.max()
    p = np.exp(x)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = int(np.searchsorted(cum, top_p)) + 1  # the smallest prefix whose mass reaches top_p
        drop = order[keep:]
        p[drop] = 0.0
        p /= p.sum()
    return p


class Sampler:
    """One sequence's sampler: ``sampler(logits_row, history) -> token id``."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits_row: np.ndarray, history: list[int]) -> int:
        p = self.params
        logits = np.asarray(logits_row).reshape(-1)
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        probs = filtered_probs(logits, p.temperature, p.top_k, p.top_p)
        u = self.rng.random()
        token = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        if token >= probs.size or probs[token] == 0:  # u at the very end of the cumulative sum (rounding)
            token = int(np.flatnonzero(probs)[-1])
        return token

"""The interface every backend session implements.

A session owns its KV cache. ``prefill(ids, mask)`` takes a left-padded batch and returns logits for
every position; ``decode(next_ids)`` appends one token per row and returns its logits. Position ids
and the growing attention mask are derived here, once, for all backends, so a parity difference is
a model difference, never a bookkeeping difference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from llmopt.models.registry import Dims


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids for a left-padded mask: 0 at the first real token, 0 on padding."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.clip(pos, 0, None).astype(np.int64)


class DecoderSession(ABC):
    """prefill/decode over a model whose KV cache the session keeps between calls."""

    dims: Dims
    backend: str = "?"

    def __init__(self) -> None:
        self._mask: np.ndarray | None = None
        self._last_only = False  # this prefill wants the last position's logits only (a session may skip the rest)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                last_only: bool = False) -> np.ndarray:
        """Run the prompt (batch, seq); returns float32 logits (batch, seq, vocab), or with ``last_only``
        (batch, 1, vocab): the last column's (a left-padded row's last token), all generation needs."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        self._mask = mask
        self.reset(ids.shape[0])
        self._last_only = last_only
        try:
            logits = self._step(ids, mask, positions_from_mask(mask))
        finally:
            self._last_only = False
        return logits[:, -1:] if last_only and logits.shape[1] > 1 else logits

    def decode(self, next_ids: np.ndarray) -> np.ndarray:
        """Append one token per row (batch,) or (batch, 1); returns logits (batch, 1, vocab)."""
        if self._mask is None:
            raise RuntimeError("decode() before prefill()")
        ids = np.ascontiguousarray(np.asarray(next_ids, dtype=np.int64).reshape(-1, 1))
        self._mask = np.concatenate([self._mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        positions = self._mask.sum(axis=1, keepdims=True) - 1
        return self._step(ids, self._mask, positions.astype(np.int64))

    @property
    def past_len(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    @abstractmethod
    def reset(self, batch: int) -> None:
        """Drop the cache; the next step starts with past length 0."""

    @abstractmethod
    def _step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run the model on ``ids`` with the full mask (past + new); keep present as the next past."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

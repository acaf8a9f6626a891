"""Incremental detokenization with stop handling, shared by `generate` and `serve`.

``TextStream.feed(token_id)`` returns the text that became printable with that token:

* text is decoded from a short window of recent tokens (vLLM's prefix/read offsets), so a tokenizer
  whose pieces depend on their neighbours (SentencePiece's leading space, byte-level BPE splitting one
  UTF-8 character over several tokens) prints exactly what decoding the whole sequence prints; a piece
  ending in an incomplete UTF-8 character (U+FFFD) waits for the next token;
* a stop string is found across token boundaries: text that could be the start of a stop string is held
  back until it is either completed (the stream finishes with ``finish_reason == "stop"`` and the text is
  cut before the stop string) or ruled out;
* an eos id finishes the stream with reason "stop" and adds no text.

``flush()`` returns what is still held back when generation ends for another reason (length).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens kept in the decode window


class TextStream:
    def __init__(self, tokenizer: Any, stop: Iterable[str] = (), eos_ids: Iterable[int] = (),
                 skip_special_tokens: bool = True, context: Iterable[int] = ()) -> None:
        """``context``: the prompt's ids; its last few tokens seed the decode window so the first
        generated piece gets the spacing it has after the prompt (SentencePiece's leading space)."""
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.eos_ids = {int(i) for i in eos_ids}
        self.skip_special = skip_special_tokens
        self.token_ids: list[int] = []      # generated ids fed so far (eos / stop token included)
        self._ids = [int(i) for i in context][-CONTEXT_TOKENS:]  # decode window source: context + generated
        self.finish_reason: str | None = None
        self.stop_hit: str | None = None     # the stop string (or "<eos>") that ended the stream
        self._text = ""          # decoded so far (before any stop cut)
        self._emitted = 0        # characters of _text already returned
        self._prefix = 0         # offsets into _ids of the decode window
        self._read = len(self._ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """Everything printable so far, including what is held back (cut before a stop string)."""
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def feed(self, token_id: int) -> str:
        """Take one generated token; return the text it made printable ('' when held back or finished)."""
        if self.finished:
            raise RuntimeError("feed() after the stream finished")
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id in self.eos_ids:
            self.finish_reason, self.stop_hit = "stop", "<eos>"
            return self._release(len(self._text))
        self._ids.append(token_id)
        ids = self._ids
        before = self._decode(ids[self._prefix:self._read])
        after = self._decode(ids[self._prefix:])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return self._release(self._safe_end())  # incomplete character (or nothing new): wait
        new = after[len(before):]
        self._prefix, self._read = self._read, len(ids)
        start = max(0, len(self._text) - max((len(s) for s in self.stop), default=0) + 1)
        self._text += new
        cut = self._first_stop(start)
        if cut is not None:
            self.finish_reason = "stop"
            self._text = self._text[:cut]
            return self._release(cut)
        return self._release(self._safe_end())

    def flush(self) -> str:
        """The held-back text, when generation stops for a reason other than a stop string (length)."""
        return self._release(len(self._text))

    def finish(self, reason: str) -> str:
        """Mark the stream finished (e.g. "length") unless a stop already did; return held-back text."""
        if self.finish_reason is None:
            self.finish_reason = reason
        return self.flush()

    def _first_stop(self, start: int) -> int | None:
        hits = [(i, s) for s in self.stop if (i := self._text.find(s, start)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self.stop_hit = s
        return i

    def _safe_end(self) -> int:
        """End of the text that cannot be the beginning of a stop string."""
        text, end = self._text, len(self._text)
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    end = min(end, len(text) - n)
                    break
        return max(end, self._emitted)

    def _release(self, end: int) -> str:
        out = self._text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out

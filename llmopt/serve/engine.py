"""What `serve` loads once: the artifact's session behind KV slots and its assets (tokenizer, chat
template, eos ids, sampling defaults: ``llmopt.runtime.assets``, the same answer `generate` gets)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.artifact import open_artifact
from llmopt.runtime import assets as A
from llmopt.runtime.sampling import SamplingParams
from llmopt.serve.slots import GqaSlots, Slots, open_slots


@dataclass
class ServedEngine:
    name: str
    path: Path
    backend: str
    slots: Slots
    assets: A.Assets

    @property
    def tokenizer(self) -> Any:
        return self.assets.tokenizer

    @property
    def eos_ids(self) -> list[int]:
        return self.assets.eos_ids

    @property
    def sampling_defaults(self) -> SamplingParams:
        return self.assets.sampling_defaults()

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    @property
    def vocab_size(self) -> int:
        return self.slots.vocab_size

    @property
    def batching(self) -> str:
        return "continuous" if isinstance(self.slots, GqaSlots) else "sequential"

    @property
    def chat_template(self) -> bool:
        return bool(self.assets.chat_template)


def open_engine(path: Path, max_batch: int | None = None, threads: int | None = None, chunk: int = 256,
                name: str | None = None) -> ServedEngine:
    from llmopt.runtime.open import backend_of, open_session

    art = open_artifact(path, ("engine", "onnx", "checkpoint"))
    assets = A.find(art)
    envelope = art.manifest.get("config", {}).get("envelope") or {}
    session = open_session(art, threads=threads)
    slots = open_slots(session, max_batch, envelope, chunk=chunk)
    return ServedEngine(name or art.path.name, art.path, backend_of(art), slots, assets)

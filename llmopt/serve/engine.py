"""What `serve` loads once: the artifact's session behind KV slots, its tokenizer, eos ids and limits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.artifact import Artifact, lineage, open_artifact
from llmopt.errors import UserError
from llmopt.serve.slots import GqaSlots, Slots, open_slots


@dataclass
class ServedEngine:
    name: str
    path: Path
    backend: str
    slots: Slots
    tokenizer: Any
    eos_ids: list[int]

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
        return bool(getattr(self.tokenizer, "chat_template", None))


def _asset_dirs(art: Artifact) -> list[Path]:
    """Where tokenizer / generation config may live: the engine itself first, then its lineage."""
    return [a.path for a in lineage(art)]


def find_tokenizer(art: Artifact) -> Any:
    from llmopt.models.loader import load_tokenizer

    for d in _asset_dirs(art):
        tok = load_tokenizer(d)
        if tok is not None:
            return tok
    raise UserError(f"{art.path}: no tokenizer in the artifact or its lineage",
                    "build the engine from a checkpoint that has tokenizer files")


def eos_ids_of(art: Artifact, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    for d in _asset_dirs(art):
        gen = d / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
            break
    return sorted(ids)


def open_engine(path: Path, max_batch: int | None = None, threads: int | None = None, chunk: int = 256,
                name: str | None = None) -> ServedEngine:
    from llmopt.runtime.open import backend_of, open_session

    art = open_artifact(path, ("engine", "onnx", "checkpoint"))
    tokenizer = find_tokenizer(art)
    envelope = art.manifest.get("config", {}).get("envelope") or {}
    session = open_session(art, threads=threads)
    slots = open_slots(session, max_batch, envelope, chunk=chunk)
    return ServedEngine(name or art.path.name, art.path, backend_of(art), slots, tokenizer, eos_ids_of(art, tokenizer))

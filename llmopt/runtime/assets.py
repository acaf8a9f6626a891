"""Where an artifact's tokenizer, chat template and generation config are: one answer for `generate`,
`bench`, `validate` and `serve`.

An engine directory carries them: the build copies the tokenizer files, the chat template and
``generation_config.json`` of the checkpoint it descends from (``copy_into``), so the directory runs
alone after it is moved. For older engines, ONNX and checkpoint artifacts, ``find`` looks in the
artifact's own directory first, then along its lineage for a checkpoint that has them.

eos ids are every id that ends a generation: ``generation_config.json``'s ``eos_token_id`` (an int or a
list: chat models often list the end-of-turn token besides end-of-text), ``config.json``'s, and the
tokenizer's ``eos_token``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from llmopt.artifact import Artifact, lineage
from llmopt.errors import UserError
from llmopt.models.loader import TOKENIZER_FILES, load_tokenizer
from llmopt.runtime.sampling import SamplingParams

GENERATION_CONFIG = "generation_config.json"
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in _TOKENIZER_MARKERS)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


@dataclass
class Assets:
    """An artifact's tokenizer directory and what it says about generation."""

    directory: Path                     # holds the tokenizer files and generation_config.json
    inside: bool                        # True: the artifact's own directory; False: found in its lineage
    generation: dict = field(default_factory=dict)  # generation_config.json (empty when absent)
    model_config: dict = field(default_factory=dict)  # config.json beside the tokenizer, when there is one

    @cached_property
    def tokenizer(self) -> Any:
        tok = load_tokenizer(self.directory)
        if tok is None:  # pragma: no cover - find() checked the files
            raise UserError(f"{self.directory}: tokenizer files unreadable")
        return tok

    def _tok_attr(self, name: str) -> Any:
        """A tokenizer attribute, None when the directory has no tokenizer (generation config alone)."""
        return getattr(self.tokenizer, name, None) if has_tokenizer(self.directory) else None

    @property
    def chat_template(self) -> str | None:
        return self._tok_attr("chat_template") or None

    @cached_property
    def eos_ids(self) -> list[int]:
        ids = _ids(self.generation.get("eos_token_id")) + _ids(self.model_config.get("eos_token_id"))
        ids += _ids(self._tok_attr("eos_token_id"))
        return sorted(set(ids))

    @property
    def bos_id(self) -> int | None:
        ids = _ids(self.generation.get("bos_token_id")) or _ids(self.model_config.get("bos_token_id"))
        return ids[0] if ids else self._tok_attr("bos_token_id")

    @property
    def pad_id(self) -> int:
        ids = _ids(self.generation.get("pad_token_id")) or _ids(self.model_config.get("pad_token_id"))
        if ids:
            return ids[0]
        tok_pad = self._tok_attr("pad_token_id")
        return int(tok_pad) if tok_pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def sampling_defaults(self) -> SamplingParams:
        """The checkpoint's own defaults: greedy unless its generation config samples."""
        g = self.generation
        rep = float(g.get("repetition_penalty") or 1.0)
        if not g.get("do_sample"):
            return SamplingParams(repetition_penalty=rep)
        return SamplingParams(temperature=float(g.get("temperature", 1.0) or 0.0), top_k=int(g.get("top_k") or 0),
                              top_p=float(g.get("top_p") or 1.0), repetition_penalty=rep)

    def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
        """Token ids of a one-turn conversation through the chat template, ready for the assistant's reply."""
        if not self.chat_template:
            raise UserError(f"{self.directory}: this model has no chat template", "drop --chat to use the prompt as it is")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])


def from_dir(directory: Path, inside: bool = True) -> Assets:
    return Assets(directory=directory, inside=inside, generation=_read_json(directory / GENERATION_CONFIG),
                  model_config=_read_json(directory / "config.json"))


def source_dir(artifact: Artifact) -> tuple[Path, bool] | None:
    """(directory with the tokenizer files, whether it is the artifact's own) or None."""
    if has_tokenizer(artifact.path):
        return artifact.path, True
    for a in lineage(artifact)[1:]:
        if a.path.is_dir() and has_tokenizer(a.path):
            return a.path, False
    return None


def find(artifact: Artifact) -> Assets:
    """The artifact's assets, or a UserError saying why there are none."""
    found = source_dir(artifact)
    if found is None:
        raise UserError(f"{artifact.path}: no tokenizer in the artifact directory or its lineage",
                        "rebuild the engine from a checkpoint that has tokenizer files (llmopt build copies them in)")
    return from_dir(*found)


def copy_into(src: Artifact, out: Path) -> dict:
    """Copy the tokenizer files, chat template and generation config of ``src``'s lineage into ``out``.

    When the checkpoint has no generation_config.json, one is written from its config.json's special
    token ids, so the engine always knows its eos ids. Returns what was copied, for the manifest."""
    found = source_dir(src)
    if found is None:
        return {"tokenizer": False, "files": [], "note": "no tokenizer in the lineage; generate/serve need one"}
    directory, _ = found
    copied = []
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            shutil.copy2(directory / name, out / name)
            copied.append(name)
    if GENERATION_CONFIG not in copied:
        cfg = _read_json(directory / "config.json")
        if not cfg:  # the onnx artifact itself has no config.json: read the checkpoint's
            ckpt = next((a for a in lineage(src) if a.kind == "checkpoint"), None)
            cfg = _read_json(ckpt.path / "config.json") if ckpt is not None else {}
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        (out / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        copied.append(GENERATION_CONFIG + " (from config.json)")
    assets = from_dir(out)
    return {"tokenizer": True, "files": copied, "from": str(directory), "eos_ids": assets.eos_ids,
            "chat_template": bool(assets.chat_template)}

"""Helpers that make bad inputs: corrupt files, re-made manifests, tiny HF checkpoint directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmopt.integrity import MANIFEST, VERIFIED, hash_table


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hf_dir(ckpt: Path, dst: Path) -> Path:
    """A plain Hugging Face checkpoint directory (no llmopt manifest) from a checkpoint artifact."""
    shutil.copytree(ckpt, dst, ignore=shutil.ignore_patterns(MANIFEST, VERIFIED))
    return dst


def remake_manifest(directory: Path) -> None:
    """Re-hash the files into the manifest, as an attacker or a careless script would: integrity then
    cannot tell, so whatever reads the files must cope."""
    m = json.loads((directory / MANIFEST).read_text())
    (directory / VERIFIED).unlink(missing_ok=True)
    m["files"], _ = hash_table(directory)
    (directory / MANIFEST).write_text(json.dumps(m, indent=2))


def flip_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(255 - b for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, fn) -> None:  # noqa: ANN001
    data = json.loads(path.read_text())
    out = fn(data)
    path.write_text(json.dumps(data if out is None else out))


def write_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))

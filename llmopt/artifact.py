"""Artifact directories: manifest, atomic commit, hashing and cache keys.

An artifact directory is built under ``<out>.partial-<random>`` beside the target, its
``manifest.json`` is written last, and only then is it moved into place with ``os.replace``.
A directory without a valid manifest is never an input or a cache hit.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as _md
from pathlib import Path
from typing import Any, Iterator

from llmopt import __version__
from llmopt.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_TAG = ".partial-"
TRASH_TAG = ".trash-"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_version(name: str) -> str | None:
    try:
        return _md.version(name)
    except _md.PackageNotFoundError:
        return None


def cache_key(stage: str, stage_version: int, config: dict, input_keys: list[str],
              packages: list[str]) -> str:
    """sha256 of the canonical description of a stage run."""
    desc = {
        "stage": stage,
        "stage_version": stage_version,
        "config": config,
        "inputs": list(input_keys),
        "packages": {p: package_version(p) for p in sorted(packages)},
    }
    return hashlib.sha256(canonical_json(desc).encode()).hexdigest()


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        v = package_version(pkg)
        if v is not None:
            env[pkg] = v
    return env


@dataclass(frozen=True)
class Artifact:
    """A committed artifact directory and its manifest."""

    path: Path
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def metadata(self) -> dict:
        return self.manifest.get("metadata", {})

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    def file(self, name: str) -> Path:
        return self.path / name


def read_manifest(path: Path, verify_hashes: bool = False) -> dict | None:
    """The manifest of ``path`` if it is a complete artifact, else None."""
    mpath = Path(path) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        return None
    for name, info in manifest.get("files", {}).items():
        f = Path(path) / name
        try:
            if f.stat().st_size != info["bytes"]:
                return None
        except OSError:
            return None
        if verify_hashes and sha256_file(f) != info["sha256"]:
            return None
    return manifest


def open_artifact(path: Path | str, kinds: tuple[str, ...] | None = None) -> Artifact:
    """Open a committed artifact or raise a UserError that says what is wrong."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such directory", "pass the output directory of an llmopt stage")
    manifest = read_manifest(p)
    if manifest is None:
        raise UserError(f"{p}: not a complete llmopt artifact (no valid {MANIFEST})",
                        "rerun the stage that writes it")
    if kinds and manifest["kind"] not in kinds:
        raise UserError(f"{p}: is a '{manifest['kind']}' artifact, expected {' or '.join(kinds)}")
    return Artifact(p.resolve(), manifest)


def file_table(directory: Path) -> dict:
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(directory).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return files


def sweep_stale(out: Path) -> None:
    """Remove leftovers of interrupted runs beside ``out`` (partial builds, trash)."""
    parent = out.parent
    if not parent.exists():
        return
    for tag in (PARTIAL_TAG, TRASH_TAG):
        for stale in parent.glob(f"{out.name}{tag}*"):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh sibling directory to build into; removed if the body raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}{PARTIAL_TAG}{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def commit(staging: Path, out: Path) -> None:
    """Move a finished staging directory into place, replacing ``out`` if it exists."""
    if out.exists():
        trash = out.parent / f"{out.name}{TRASH_TAG}{secrets.token_hex(4)}"
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


def new_manifest(*, stage: str, kind: str, key: str, inputs: list[Artifact], config: dict,
                 metadata: dict, directory: Path, started: float, finished: float) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "llmopt_version": __version__,
        "stage": stage,
        "kind": kind,
        "key": key,
        "inputs": [{"path": str(a.path), "key": a.key, "kind": a.kind} for a in inputs],
        "config": config,
        "files": file_table(directory),
        "metadata": metadata,
        "environment": environment(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(finished - started, 3),
    }


def lineage(artifact: Artifact) -> list[Artifact]:
    """This artifact and its ancestors, following the first input of each manifest."""
    chain = [artifact]
    seen = {artifact.key}
    current = artifact
    while current.manifest.get("inputs"):
        ref = current.manifest["inputs"][0]
        manifest = read_manifest(Path(ref["path"]))
        if manifest is None or manifest["key"] != ref["key"] or manifest["key"] in seen:
            break
        current = Artifact(Path(ref["path"]), manifest)
        seen.add(current.key)
        chain.append(current)
    return chain

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
from dataclasses import dataclass
from importlib import metadata as _md
from pathlib import Path
from typing import Any

from llmopt import __version__
from llmopt.errors import UserError
from llmopt.integrity import MANIFEST, Problem, check_files, content_files, hash_table, sha256_file, write_cache
from llmopt.staging import PARTIAL_TAG, TRASH_TAG, commit, staging_dir, sweep_stale  # noqa: F401 (re-exported)

SCHEMA_VERSION = 1


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


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


def load_manifest(path: Path) -> dict | None:
    """The parsed manifest of ``path`` when it has one of this schema (files not checked), else None."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        return None
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("key"), str) \
            or not isinstance(manifest.get("kind"), str) or not isinstance(manifest.get("inputs", []), list):
        return None
    return manifest


def read_manifest(path: Path) -> dict | None:
    """The manifest of ``path`` if it is a complete artifact (every listed file has its size), else None."""
    manifest = load_manifest(path)
    if manifest is None:
        return None
    for name, info in manifest["files"].items():
        try:
            if (Path(path) / name).stat().st_size != info["bytes"]:
                return None
        except (OSError, TypeError, KeyError):
            return None
    return manifest


def problems_of(path: Path, manifest: dict, *, use_cache: bool = True) -> list[Problem]:
    return check_files(Path(path), manifest["files"], use_cache=use_cache)


def integrity_error(path: Path, problems: list[Problem]) -> UserError:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return UserError(f"{problems[0].line(path)}{more} — the artifact does not match its manifest",
                     f"rerun the stage that wrote it; `llmopt verify {path}` lists every difference")


def open_artifact(path: Path | str, kinds: tuple[str, ...] | None = None) -> Artifact:
    """Open a committed artifact whose files match its manifest, or raise a UserError saying what is wrong."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such directory", "pass the output directory of an llmopt stage")
    if not p.is_dir():
        raise UserError(f"{p}: is a file, not an artifact directory", "pass the output directory of an llmopt stage")
    manifest = load_manifest(p)
    if manifest is None:
        raise UserError(f"{p}: not a complete llmopt artifact (no valid {MANIFEST})",
                        "rerun the stage that writes it")
    if kinds and manifest["kind"] not in kinds:
        raise UserError(f"{p}: is a '{manifest['kind']}' artifact, expected {' or '.join(kinds)}")
    problems = problems_of(p, manifest)
    if problems:
        raise integrity_error(p, problems)
    return Artifact(p.resolve(), manifest)


def file_table(directory: Path) -> dict:
    """{name: {sha256, bytes}} for every file of ``directory`` (content fingerprint of a source)."""
    return {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
            for n in content_files(directory)}


def write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


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
        "files": _hash_and_cache(directory),
        "metadata": metadata,
        "environment": environment(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(finished - started, 3),
    }


def _hash_and_cache(directory: Path) -> dict:
    """The file table of a staging directory; the hashes also seed its verified-hash cache."""
    files, cache = hash_table(directory)
    write_cache(directory, cache)
    return files


def ancestor(ref: Any) -> tuple[Artifact | None, str]:
    """The artifact an ``inputs`` entry points at, or None and why it is not reachable."""
    if not isinstance(ref, dict) or not isinstance(ref.get("path"), str):
        return None, "malformed input entry"
    p = Path(ref["path"])
    manifest = load_manifest(p)
    if manifest is None:
        return None, "not reachable (no artifact at that path)"
    if manifest["key"] != ref.get("key"):
        return None, "not reachable (replaced by a different build)"
    return Artifact(p, manifest), "ok"


def lineage(artifact: Artifact) -> list[Artifact]:
    """This artifact and its reachable ancestors (first input of each manifest), each checked against its
    manifest: a reachable ancestor whose files changed is a UserError, an unreachable one ends the chain."""
    chain = [artifact]
    seen = {artifact.key}
    current = artifact
    while current.manifest.get("inputs"):
        found, _ = ancestor(current.manifest["inputs"][0])
        if found is None or found.key in seen:
            break
        problems = problems_of(found.path, found.manifest)
        if problems:
            raise integrity_error(found.path, problems)
        current = found
        seen.add(current.key)
        chain.append(current)
    return chain

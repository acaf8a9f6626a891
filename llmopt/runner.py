"""Runs stages: cache decisions, staging directories, manifests, lineage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from llmopt.artifact import (Artifact, cache_key, commit, file_table, lineage, new_manifest, read_manifest,
                             staging_dir, sweep_stale, write_manifest)
from llmopt import resources
from llmopt.errors import UserError
from llmopt.models import presets
from llmopt.progress import SILENT, Progress
from llmopt.stages.base import Stage

Log = Callable[[str], None]


@dataclass(frozen=True)
class StageRun:
    artifact: Artifact
    reused: bool


def _fingerprint(value: Any) -> Any:
    """Replace paths to files/directories by their content hashes, so the key follows content."""
    if isinstance(value, dict):
        return {k: _fingerprint(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fingerprint(v) for v in value]
    if isinstance(value, str) and value.startswith("preset:tiny-trained"):
        return {"preset": value, "files": {k: v["sha256"] for k, v in file_table(presets.TINY_TRAINED).items()}}
    if isinstance(value, str) and value.startswith("/"):
        p = Path(value)
        if p.is_file():
            from llmopt.artifact import sha256_file

            return {"path": value, "sha256": sha256_file(p)}
        if p.is_dir():
            return {"path": value, "files": {k: v["sha256"] for k, v in file_table(p).items()}}
    return value


def key_for(stage: Stage, config: BaseModel, inputs: list[Artifact]) -> tuple[str, dict]:
    resolved = config.model_dump(mode="json")
    described = _fingerprint(resolved)
    default = stage.default_file(config)
    if default is not None and default.exists():
        described["default_text"] = _fingerprint(str(default))
    key = cache_key(stage.name, stage.version, described, [a.key for a in inputs], list(stage.packages))
    return key, resolved


def run_stage(stage: Stage, config: BaseModel, inputs: list[Artifact], out: Path, *, force: bool = False,
              progress: Progress = SILENT, log: Log = lambda m: None) -> StageRun:
    for art in inputs[:1]:
        if stage.input_kinds and art.kind not in stage.input_kinds:
            raise UserError(f"{art.path}: is a '{art.kind}' artifact; {stage.name} needs {' or '.join(stage.input_kinds)}")
    out = Path(out).resolve()
    key, resolved = key_for(stage, config, inputs)
    existing = read_manifest(out)
    if existing is not None and existing["key"] == key and not force:
        log(f"[green]✓[/] {stage.name}: up to date, reusing {out} (key {key[:12]})")
        return StageRun(Artifact(out, existing), reused=True)
    if out.exists() and existing is None and any(out.iterdir()) and not force:
        raise UserError(f"{out}: exists and is not an llmopt artifact", "choose another output directory or pass --force")
    if existing is not None:
        why = "--force" if force and existing["key"] == key else "inputs or config changed"
        log(f"[yellow]↻[/] {stage.name}: rebuilding {out} ({why})")
    estimate = stage.estimate(config, inputs)
    resources.check(stage.name, estimate, out, force)
    sweep_stale(out)
    started = time.time()
    with staging_dir(out) as tmp:
        with resources.measure(estimate) as usage:
            metadata = stage.run(config, inputs, tmp, progress)
        metadata = {**metadata, "resources": usage.record(tmp)}
        manifest = new_manifest(stage=stage.name, kind=stage.kind, key=key, inputs=inputs, config=resolved,
                                metadata=metadata, directory=tmp, started=started, finished=time.time())
        write_manifest(tmp, manifest)
        commit(tmp, out)
    log(f"[green]✓[/] {stage.name}: wrote {out} in {manifest['duration_s']:.1f}s")
    return StageRun(Artifact(out, manifest), reused=False)


def validation_inputs(artifact: Artifact, reference: Artifact | None = None) -> list[Artifact]:
    """[artifact, its own checkpoint, the unquantized checkpoint (when quantized)]."""
    ckpts = [a for a in lineage(artifact) if a.kind == "checkpoint"]
    if not ckpts and reference is None:
        raise UserError(f"{artifact.path}: cannot find the checkpoint it came from (lineage broken)",
                        "pass --reference CKPT")
    own = ckpts[0] if ckpts else reference
    if own.stage == "quantize":
        base = reference or (ckpts[1] if len(ckpts) > 1 else None)
        return [artifact, own] + ([base] if base is not None else [])
    return [artifact, reference or own]

"""Runs stages: cache decisions, staging directories, manifests, lineage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from llmopt import faults, resources

from llmopt.artifact import (Artifact, cache_key, commit, file_table, lineage, load_manifest, new_manifest,
                             problems_of, staging_dir, sweep_stale, write_manifest)
from llmopt.errors import UserError, raise_if_interrupted
from llmopt.integrity import content_files
from llmopt.models import presets
from llmopt.paths import check_output
from llmopt.readers import reading
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
            from llmopt.integrity import sha256_file

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
    extra = stage.key_extra(config, inputs)
    if extra is not None:
        described["extra"] = extra
    key = cache_key(stage.name, stage.version, described, [a.key for a in inputs], list(stage.packages))
    return key, resolved


def _config_paths(value: Any) -> list[Path]:
    """Every existing absolute path named in a resolved config."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _config_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _config_paths(v)]
    if isinstance(value, str) and value.startswith("/") and Path(value).exists():
        return [Path(value)]
    return []


def existing_output(out: Path) -> dict | None:
    """The manifest of an llmopt artifact at ``out``; None when ``out`` is absent or an empty directory.

    Anything else is refused, with or without --force: llmopt replaces only directories it wrote, and
    only when they hold nothing but the files their manifest lists.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"{out}: exists and is a file, not an artifact directory", "choose another output directory")
    manifest = load_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise UserError(f"{out}: exists and is not an llmopt artifact; llmopt never replaces a directory it did "
                            "not write", "choose another output directory, or move its contents away yourself")
        return None
    extra = [n for n in content_files(out) if n not in manifest["files"]]
    if extra:
        raise UserError(f"{out}: holds {out / extra[0]}, which llmopt did not write", "move it away or choose "
                        "another output directory")
    return manifest


def _read_from(config: BaseModel, inputs: list[Artifact]) -> Path | str:
    """What a stage reads (for messages): its first input artifact, else its source."""
    return inputs[0].path if inputs else getattr(config, "source", "input")


def run_stage(stage: Stage, config: BaseModel, inputs: list[Artifact], out: Path, *, force: bool = False,
              progress: Progress = SILENT, log: Log = lambda m: None) -> StageRun:
    for art in inputs[:1]:
        if stage.input_kinds and art.kind not in stage.input_kinds:
            raise UserError(f"{art.path}: is a '{art.kind}' artifact; {stage.name} needs {' or '.join(stage.input_kinds)}")
    out = Path(out).resolve()
    key, resolved = key_for(stage, config, inputs)
    check_output(out, [("input", a.path) for a in inputs] + [("file named in the config", p)
                                                            for p in _config_paths(resolved)])
    existing = existing_output(out)
    if existing is not None and existing["key"] == key and not force:
        problems = problems_of(out, existing)
        if not problems:
            log(f"[green]✓[/] {stage.name}: up to date, reusing {out} (key {key[:12]})")
            return StageRun(Artifact(out, existing), reused=True)
        log(f"[yellow]↻[/] {stage.name}: rebuilding {out} ({problems[0].line(out)})")
    elif existing is not None:
        why = "--force" if force and existing["key"] == key else "inputs or config changed"
        log(f"[yellow]↻[/] {stage.name}: rebuilding {out} ({why})")
    with reading(_read_from(config, inputs), "input" if inputs else "source"):  # preflight reads the inputs too
        estimate = stage.estimate(config, inputs)
    resources.check(stage.name, estimate, out, force)
    sweep_stale(out)
    started = time.time()
    with staging_dir(out) as tmp:
        faults.point(stage.name, "staged")
        with reading(_read_from(config, inputs), "input" if inputs else "source"), resources.measure(estimate) as usage:
            metadata = stage.run(config, inputs, tmp, progress)
        metadata = {**metadata, "resources": usage.record(tmp)}
        faults.point(stage.name, "ran")
        manifest = new_manifest(stage=stage.name, kind=stage.kind, key=key, inputs=inputs, config=resolved,
                                metadata=metadata, directory=tmp, started=started, finished=time.time())
        write_manifest(tmp, manifest)
        faults.point(stage.name, "manifest")
        raise_if_interrupted()
        commit(tmp, out, on_swap=lambda: faults.point(stage.name, "swapped"))
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

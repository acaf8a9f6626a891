"""convert: run the recipe's chain in a work directory, reusing every stage whose key matches."""

from __future__ import annotations

import os
from pathlib import Path

from llmopt.errors import GateFailed, UserError
from llmopt.preflight import preflight
from llmopt.progress import Progress
from llmopt.recipe import STAGES, Recipe, dump_recipe
from llmopt.recipe_terms import in_recipe_terms
from llmopt.runner import Log, StageRun, run_stage, validation_inputs
from llmopt.stages import build, export, load, validate
from llmopt.workdir import locked_workdir

DIRS = {"load": "checkpoint", "quantize": "quantized", "export": "onnx", "build": "engine", "validate": "report"}


def plan(recipe: Recipe) -> list[str]:
    skip = {"quantize"} if recipe.quantize is None else set()
    if recipe.validate_ is None:
        skip.add("validate")
    return [s for s in STAGES if s not in skip]


def save_resolved(recipe: Recipe, workdir: Path) -> Path:
    path = workdir / "recipe.resolved.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_recipe(recipe))
    os.replace(tmp, path)
    return path


def convert(recipe: Recipe, workdir: Path, *, from_stage: str | None = None, force: bool = False,
            progress: Progress, log: Log) -> dict:
    stages = plan(recipe)
    if from_stage is not None and from_stage not in stages:
        raise UserError(f"--from {from_stage}: not a stage of this recipe", f"stages: {', '.join(stages)}")
    preflight(recipe, workdir, stages)
    with locked_workdir(workdir):
        try:
            return _run(recipe, workdir, stages, from_stage, force, progress, log)
        except UserError as exc:  # a stage's hint names its subcommand's flags; here they are recipe fields
            raise in_recipe_terms(exc) from None


def _run(recipe: Recipe, workdir: Path, stages: list[str], from_stage: str | None, force: bool,
         progress: Progress, log: Log) -> dict:
    save_resolved(recipe, workdir)
    forced_from = stages.index(from_stage) if from_stage else (0 if force else len(stages))
    runs: dict[str, StageRun] = {}
    current = None
    for i, name in enumerate(stages):
        out = workdir / DIRS[name]
        f = i >= forced_from
        if name == "load":
            r = run_stage(load.STAGE, recipe.model, [], out, force=f, progress=progress, log=log)
        elif name == "quantize":
            from llmopt.stages import quantize

            r = run_stage(quantize.STAGE, recipe.quantize, [current], out, force=f, progress=progress, log=log)
        elif name == "export":
            r = run_stage(export.STAGE, recipe.export, [current], out, force=f, progress=progress, log=log)
        elif name == "build":
            cfg = recipe.build.model_copy(update={"envelope": recipe.envelope})
            r = run_stage(build.STAGE, cfg, [current], out, force=f, progress=progress, log=log)
        else:
            r = run_stage(validate.STAGE, recipe.validate_, validation_inputs(current), out, force=f,
                          progress=progress, log=log)
        runs[name] = r
        current = r.artifact
    result = {"recipe": recipe.name, "workdir": str(workdir),
              "stages": {n: {"path": str(r.artifact.path), "key": r.artifact.key, "reused": r.reused}
                         for n, r in runs.items()}}
    if "validate" in runs:
        md = runs["validate"].artifact.metadata
        result["validation"] = {"passed": md["passed"], "checks": md["checks"]}
        if not md["passed"]:
            from llmopt.validate_report import failures

            raise GateFailed(failures(md["checks"]), result)
    return result

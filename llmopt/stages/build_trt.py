"""build, backend tensorrt: ONNX artifact → ``model.engine`` + ``engine.json`` + ``build.log``.

The build dispatcher calls :func:`run` when ``config.backend == "tensorrt"``. TensorRT engines are
CUDA-only, so ``config.device`` is not consulted: the CLI's default ``--device cpu`` must not stop
``llmopt build ONNX -o DIR --backend tensorrt``. Profiles are derived from the envelope and checked
against TensorRT's rules here, on any machine, before TensorRT is needed; then the adapter builds (it
raises the install hint without TensorRT or a GPU).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import onnx

from llmopt.artifact import Artifact
from llmopt.errors import UserError
from llmopt.progress import Progress
from llmopt.recipe import BuildConfig
from llmopt.trt.compat import ENGINE_FILE, ENGINE_JSON, engine_metadata, precision_of
from llmopt.trt.profiles import derive_profiles
from llmopt.trt.qdq import external_files, int8_from_uint8, qdq_problems

BUILD_LOG = "build.log"
PACKAGES = ("tensorrt",)  # versions that change the output, for the build stage's cache key


def read_onnx_artifact(artifact: Artifact) -> tuple[Path, dict]:
    onnx_path, io_path = artifact.file("model.onnx"), artifact.file("io.json")
    for f in (onnx_path, io_path):
        if not f.exists():
            raise UserError(f"{artifact.path}: no {f.name}", "pass the output directory of llmopt export")
    try:
        io = json.loads(io_path.read_text())
    except ValueError:
        raise UserError(f"{io_path}: not valid JSON", "re-export the model with llmopt export") from None
    return onnx_path, io


def run(config: BuildConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    if config.backend != "tensorrt":
        raise ValueError(f"build_trt.run called for backend {config.backend!r}")
    onnx_path, io = read_onnx_artifact(inputs[0])
    profiles = derive_profiles(config.envelope, io)
    model = onnx.load(str(onnx_path), load_external_data=False)
    rewritten = int8_from_uint8(model)
    problems = qdq_problems(model, onnx_path.parent)
    if problems:
        raise UserError(f"{onnx_path}: {len(problems)} Q/DQ node(s) TensorRT cannot build, first: {problems[0]}",
                        "quantize with symmetric, signed int8 activations (zero point 0) for TensorRT")

    from llmopt.trt import adapter  # the stage stays importable without tensorrt

    lines: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="llmopt-trt-") as tmp:
            parse_path = onnx_path
            if rewritten:  # parse a copy whose external data links to the original file
                lines.append(f"[llmopt] {rewritten} uint8 zero points of 128 rewritten as int8 zero points of 0")
                parse_path = Path(tmp) / onnx_path.name
                parse_path.write_bytes(model.SerializeToString())
                for name in external_files(model):
                    os.symlink((onnx_path.parent / name).resolve(), Path(tmp) / name)
            with progress.task("build TensorRT engine (strongly typed)"):
                engine, info = adapter.build_engine(parse_path, profiles, config, lines.append)
    finally:
        (out / BUILD_LOG).write_text("\n".join(lines) + ("\n" if lines else ""))
    (out / ENGINE_FILE).write_bytes(engine)
    gpu = info.pop("gpu")
    meta = engine_metadata(tensorrt_version=info["tensorrt_version"], gpu=gpu, profiles=profiles, io=io,
                           hardware_compat=config.hardware_compat, version_compatible=config.version_compatible,
                           workspace_gib=config.workspace_gib, engine_bytes=len(engine), build_info=info)
    (out / ENGINE_JSON).write_text(json.dumps(meta, indent=2))
    (out / "io.json").write_text(json.dumps(io, indent=2))  # as every engine carries it (engine.json has it too)
    return {
        "backend": "tensorrt",
        "device": "cuda",
        "tensorrt_version": info["tensorrt_version"],
        "gpu": gpu.to_json(),
        "precision": precision_of(io)["mode"],
        "profiles": [p.to_json() for p in profiles],
        "hardware_compat": config.hardware_compat,
        "version_compatible": config.version_compatible,
        "engine_bytes": len(engine),
        "build_s": info["build_s"],
        "timing_cache": info["timing_cache"],
        "onnx_rewrites": {"uint8_zero_point_128_to_int8": rewritten},
    }

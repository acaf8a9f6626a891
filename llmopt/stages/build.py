"""build: dispatch to the ONNX Runtime or TensorRT backend, after copying in what running the engine needs
besides the model (tokenizer files, chat template, generation config: llmopt.runtime.assets), so the
engine directory is self-contained."""

from __future__ import annotations

from pathlib import Path

from llmopt.artifact import Artifact
from llmopt.progress import Progress
from llmopt.recipe import BuildConfig
from llmopt.stages.base import Stage


def default_file(config: BuildConfig) -> Path | None:
    """The int8 KV cache scales are calibrated on the shipped text unless the config names one."""
    if config.kv_cache == "int8" and config.kv_calibration.text is None:
        from llmopt.models import presets

        return presets.DEFAULT_CALIB_TEXT
    return None


def run(config: BuildConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    from llmopt.runtime import assets

    copied = assets.copy_into(inputs[0], out)
    if config.backend == "tensorrt":
        from llmopt.stages import build_trt

        return {**build_trt.run(config, inputs, out, progress), "assets": copied}
    from llmopt.stages import build_ort

    return {**build_ort.run(config, inputs, out, progress), "assets": copied}


def estimate(config: BuildConfig, inputs: list[Artifact]):  # noqa: ANN201 - Estimate | None
    if config.backend != "onnxruntime":
        return None  # TensorRT builds on the GPU; host memory is not what limits it
    from llmopt.estimates import build_estimate

    return build_estimate(config, inputs)


STAGE = Stage(name="build", kind="engine", version=4, config_model=BuildConfig, run=run, input_kinds=("onnx",),
              packages=("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"), default_file=default_file,
              estimate=estimate)

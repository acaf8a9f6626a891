"""engine.json: what a TensorRT engine was built with, and whether this machine may run it.

TensorRT's documented rules (Engine Compatibility / Version Compatibility pages):
- an engine runs only with the TensorRT version that built it, unless built with
  ``BuilderFlag.VERSION_COMPATIBLE``; then it runs with that version or any later one;
- an engine runs only on the kind of GPU that built it (same compute capability here), unless built with
  a hardware-compatibility level: ``SAME_COMPUTE_CAPABILITY`` (any GPU of that compute capability; needs
  Turing 7.5+ to build) or ``AMPERE_PLUS`` (any GPU of compute capability 8.0+; needs Ampere to build).
"""

from __future__ import annotations

import re

from llmopt.errors import UserError
from llmopt.trt.gpu import GpuInfo
from llmopt.trt.profiles import Profile

ENGINE_JSON = "engine.json"
ENGINE_FILE = "model.engine"
SCHEMA = 1
HW_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-compute-capability": "SAME_COMPUTE_CAPABILITY"}
_MIN_BUILD_CC = {"ampere+": (8, 0), "same-compute-capability": (7, 5)}


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); stops at the first part that is not a number ('11.0.0rc1' -> (11, 0))."""
    parts = []
    for part in version.split("."):
        m = re.fullmatch(r"\d+", part)
        if m is None:
            break
        parts.append(int(part))
    return tuple(parts)


def cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


def precision_of(io: dict) -> dict:
    """Precision as the export decided it (strongly typed: the ONNX graph's types are the engine's)."""
    q = io.get("quantization") or None
    dtype = io.get("dtype", "float32")
    if q is None:
        mode = {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)
    else:
        bits, method = q.get("bits"), q.get("method", "?")
        mode = f"int8 W8A8 ({method})" if bits == 8 else f"int{bits} weight-only ({method})"
    return {"mode": mode, "dtype": dtype, "kv_dtype": io.get("kv_dtype", dtype), "quantization": q}


def check_build_request(hardware_compat: str, gpu: GpuInfo) -> None:
    """Refuse a hardware-compatibility level the build GPU cannot produce."""
    need = _MIN_BUILD_CC.get(hardware_compat)
    if need is not None and cc_tuple(gpu.compute_capability) < need:
        raise UserError(f"--hardware-compat {hardware_compat} needs a build GPU of compute capability "
                        f"{need[0]}.{need[1]}+, this one ({gpu.name}) is {gpu.compute_capability}",
                        "build with --hardware-compat none")


def engine_metadata(*, tensorrt_version: str, gpu: GpuInfo, profiles: list[Profile], io: dict,
                    hardware_compat: str, version_compatible: bool, workspace_gib: float,
                    engine_bytes: int, build_info: dict | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "tensorrt_version": tensorrt_version,
        "gpu": gpu.to_json(),
        "hardware_compat": hardware_compat,
        "version_compatible": version_compatible,
        "precision": precision_of(io),
        "profiles": [p.to_json() for p in profiles],
        "workspace_gib": workspace_gib,
        "engine_bytes": engine_bytes,
        "build": build_info or {},
        "io": io,
    }


def check_engine_compat(meta: dict, tensorrt_version: str, gpu: GpuInfo, where: str = "engine") -> list[str]:
    """Raise a one-line UserError if this TensorRT/GPU may not run the engine; return warnings otherwise."""
    missing = [k for k in ("schema", "tensorrt_version", "gpu", "hardware_compat", "version_compatible")
               if k not in meta]
    if missing or meta.get("schema") != SCHEMA:
        raise UserError(f"{where}: {ENGINE_JSON} is missing {', '.join(missing) or 'a known schema'}",
                        "rebuild the engine with llmopt build --backend tensorrt")
    built, here = meta["tensorrt_version"], tensorrt_version
    if meta["version_compatible"]:
        if version_tuple(here) < version_tuple(built):
            raise UserError(f"{where}: built with TensorRT {built} (version-compatible), this machine has the "
                            f"older TensorRT {here}; version-compatible engines run only on the same or a newer "
                            "TensorRT", f"upgrade TensorRT to {built}+ or rebuild here")
    elif version_tuple(here) != version_tuple(built):
        raise UserError(f"{where}: built with TensorRT {built}, this machine has TensorRT {here}",
                        "rebuild it here, or build with --version-compatible")
    bgpu, level = meta["gpu"], meta["hardware_compat"]
    b_cc, h_cc = cc_tuple(bgpu["compute_capability"]), cc_tuple(gpu.compute_capability)
    if level == "ampere+":
        if h_cc < (8, 0):
            raise UserError(f"{where}: built hardware-compatible for Ampere+ (compute capability 8.0+), this "
                            f"GPU ({gpu.name}) is {gpu.compute_capability}", "rebuild it on this GPU")
        return []
    if b_cc != h_cc:
        extra = "" if level == "same-compute-capability" else " and not hardware-compatible"
        raise UserError(f"{where}: built for compute capability {bgpu['compute_capability']} "
                        f"({bgpu['name']}){extra}, this GPU ({gpu.name}) is {gpu.compute_capability}",
                        "rebuild it on this GPU, or build with --hardware-compat ampere+")
    if level == "none" and bgpu["name"] != gpu.name:
        return [f"{where}: built on {bgpu['name']}, running on {gpu.name} (same compute capability "
                f"{gpu.compute_capability}); TensorRT may reject it or run slower than an engine built here"]
    return []

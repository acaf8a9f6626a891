"""The only module that imports ``tensorrt`` -- lazily, inside functions, so ``--help``, ``doctor`` and
every CPU path work without it.

Written against the TensorRT 10/11 Python API (NVIDIA/TensorRT python/src/infer/pyCore.cpp, 11.1): a
strongly typed network (``STRONGLY_TYPED`` is required on 10.x and accepted-but-ignored on 11.x, where
strong typing is always on), parsed from the ONNX *file path* so the parser resolves the external-data
file beside it (TensorRT issue #4257), no FP16/INT8 builder flags (removed in 11.x: precision comes from
the ONNX graph), ``build_serialized_network``.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmopt.errors import UserError
from llmopt.recipe import BuildConfig
from llmopt.trt import timing_cache
from llmopt.trt.compat import HW_LEVELS, check_build_request
from llmopt.trt.gpu import INSTALL_HINT, current_gpu, require_gpu
from llmopt.trt.profiles import Profile, validate_profiles

Log = Callable[[str], None]


def import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not
        raise UserError(f"TensorRT is not installed or cannot load ({exc})", INSTALL_HINT) from None


def tensorrt_version() -> str:
    return str(import_tensorrt().__version__)


def tensorrt_status() -> dict:
    """For ``llmopt doctor``: {importable, version, cuda_available, gpu_name, compute_capability, error}."""
    gpu = current_gpu()
    status: dict = {"importable": False, "version": None, "cuda_available": gpu is not None,
                    "gpu_name": gpu.name if gpu else None,
                    "compute_capability": gpu.compute_capability if gpu else None, "error": None}
    try:
        found = importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        status["error"] = f"tensorrt is not installed; {INSTALL_HINT}"
        return status
    try:
        trt = importlib.import_module("tensorrt")
        status.update(importable=True, version=str(getattr(trt, "__version__", "?")))
    except Exception as exc:  # noqa: BLE001 - any load failure is what doctor must report
        status["error"] = f"{type(exc).__name__}: {exc}"
    if status["importable"] and gpu is None:
        status["error"] = "no CUDA GPU visible to torch (a CUDA build of torch and an NVIDIA driver are needed)"
    return status


class _Sink:
    """Collects TensorRT's log lines (INFO and above) and remembers the last error."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.last_error: str | None = None

    def __call__(self, severity: Any, msg: str) -> None:
        level = int(severity)
        if level <= 3:  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            self.log(f"[{getattr(severity, 'name', level)}] {msg}")
        if level <= 1:
            self.last_error = msg


def _logger(trt: Any, sink: _Sink) -> Any:
    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            sink(severity, msg)

    return _Logger()


def build_engine(onnx_path: Path, profiles: list[Profile], config: BuildConfig, log: Log) -> tuple[bytes, dict]:
    """Parse ``onnx_path``, add ``profiles``, build; returns the serialized engine and build facts."""
    trt = import_tensorrt()
    gpu = require_gpu()
    check_build_request(config.hardware_compat, gpu)
    sink = _Sink(log)
    logger = _logger(trt, sink)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(Path(onnx_path).resolve())):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for err in errors:
            log(f"[PARSER] {err}")
        first = errors[0] if errors else (sink.last_error or "no error reported")
        raise UserError(f"{onnx_path}: TensorRT's ONNX parser failed ({len(errors)} errors), first: {first}",
                        "check the opset and operators against TensorRT's ONNX support matrix")
    specs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        specs.append({"name": t.name, "shape": [int(d) for d in t.shape]})
    validate_profiles(profiles, specs)  # against the parsed network, not only io.json
    dynamic = [s["name"] for s in specs if any(d < 0 for d in s["shape"])]

    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    for index, p in enumerate(profiles):
        prof = builder.create_optimization_profile()
        for name in dynamic:
            r = p.shapes[name]
            prof.set_shape(name, r.min, r.opt, r.max)
        got = cfg.add_optimization_profile(prof)
        if got != index:
            raise UserError(f"TensorRT rejected optimization profile '{p.name}' (returned {got}): "
                            f"{sink.last_error or 'no reason given'}")
    if config.hardware_compat != "none":
        cfg.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HW_LEVELS[config.hardware_compat])
    if config.version_compatible:
        cfg.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)

    version = str(trt.__version__)
    cache_path = Path(config.timing_cache) if config.timing_cache else timing_cache.default_path(
        version, gpu.compute_capability)
    loaded = timing_cache.read(cache_path)
    cache = cfg.create_timing_cache(loaded)
    reused = bool(loaded)
    if not cfg.set_timing_cache(cache, ignore_mismatch=False):
        log(f"[llmopt] timing cache {cache_path} was made on another device or TensorRT; starting an empty one")
        reused = False
        cache = cfg.create_timing_cache(b"")
        cfg.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, cfg)
    build_s = time.perf_counter() - start
    if plan is None:
        raise UserError(f"TensorRT could not build the engine: {sink.last_error or 'no error reported'}",
                        "a larger --workspace or a smaller envelope may help")
    engine = bytes(plan)

    ours = cfg.get_timing_cache()

    def merge(current: bytes) -> bytes:
        if current and current != loaded and not ours.combine(cfg.create_timing_cache(current), False):
            log("[llmopt] could not merge the timing cache on disk into this build's; replacing it")
        return bytes(ours.serialize())

    saved = timing_cache.update(cache_path, merge)
    log(f"[llmopt] timing cache {cache_path}: loaded {len(loaded)} bytes, saved {saved} bytes")
    info = {"tensorrt_version": version, "gpu": gpu, "network_inputs": specs, "dynamic_inputs": dynamic,
            "num_layers": int(network.num_layers), "build_s": round(build_s, 3),
            "timing_cache": {"path": str(cache_path), "reused": reused, "loaded_bytes": len(loaded),
                             "saved_bytes": saved}}
    return engine, info


@dataclass
class LoadedEngine:
    engine: Any
    runtime: Any  # kept alive as long as the engine
    logger: Any
    sink: _Sink


@dataclass(frozen=True)
class TensorIO:
    name: str
    is_input: bool
    dtype: str  # TensorRT DataType name: FLOAT, HALF, BF16, INT64, INT32, ...


def load_engine(plan: bytes, *, allow_host_code: bool, log: Log) -> LoadedEngine:
    """Deserialize a plan. ``allow_host_code`` for version-compatible plans (they embed the lean runtime)."""
    trt = import_tensorrt()
    require_gpu()
    sink = _Sink(log)
    logger = _logger(trt, sink)
    runtime = trt.Runtime(logger)
    if allow_host_code:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise UserError(f"TensorRT could not deserialize the engine: {sink.last_error or 'no error reported'}",
                        "rebuild it on this machine")
    return LoadedEngine(engine, runtime, logger, sink)


def io_tensors(engine: Any) -> list[TensorIO]:
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        out.append(TensorIO(name, getattr(mode, "name", str(mode)) == "INPUT",
                            getattr(engine.get_tensor_dtype(name), "name", "?")))
    return out

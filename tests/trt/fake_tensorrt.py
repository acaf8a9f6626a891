"""A fake ``tensorrt`` module that records every call llmopt makes. It builds nothing: the "plan" is canned
bytes, the timing cache is canned bytes, and the execution context only reports output shapes (from the
input shapes it was given) and writes a known pattern into the logits buffer so the read-back path is
checked. Its surface mirrors the TensorRT 11 Python API (NVIDIA/TensorRT python/src/infer/pyCore.cpp):
there is no ``BuilderFlag.FP16`` / ``INT8``, so code that used them would fail here too.
"""

from __future__ import annotations

import ctypes
import enum
import os
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLAN = b"FAKE-TENSORRT-PLAN"
VERSION = "11.1.0.7"


@dataclass
class Recorder:
    calls: list[tuple[str, tuple]] = field(default_factory=list)

    def add(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def of(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


class Severity(enum.IntEnum):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                             {"STRONGLY_TYPED": 0, "PREFER_AOT_PYTHON_PLUGINS": 1})
MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "TACTIC_SHARED_MEMORY": 5})
BuilderFlag = enum.IntEnum("BuilderFlag", {"DEBUG": 0, "REFIT": 2, "VERSION_COMPATIBLE": 9,
                                           "EXCLUDE_LEAN_RUNTIME": 10, "STRIP_PLAN": 14})
HardwareCompatibilityLevel = enum.IntEnum("HardwareCompatibilityLevel",
                                          {"NONE": 0, "AMPERE_PLUS": 1, "SAME_COMPUTE_CAPABILITY": 2})
DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "INT64": 9})
TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
_DT = {"float32": DataType.FLOAT, "float16": DataType.HALF, "int64": DataType.INT64}
_NP = {"float32": np.float32, "float16": np.float16}


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass


def make_module(rec: Recorder, io: dict, *, network_inputs: list[dict] | None = None, parse_ok: bool = True,
                build_ok: bool = True, cache_matches: bool = True) -> types.ModuleType:
    """``network_inputs``: what the parser "finds" ({name, shape} with -1 for dynamic dims); default: io.json."""
    net_inputs = network_inputs or [{"name": t["name"], "shape": [d if isinstance(d, int) else -1
                                                                for d in t["shape"]]} for t in io["inputs"]]

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            self.blob = bytes(blob)

        def serialize(self) -> bytes:
            rec.add("timing_cache.serialize")
            return self.blob + b"+timed"

        def combine(self, other: "TimingCache", ignore_mismatch: bool) -> bool:
            rec.add("timing_cache.combine", other.blob, ignore_mismatch)
            return True

    class Profile:
        def set_shape(self, name: str, mn: tuple, opt: tuple, mx: tuple) -> None:
            rec.add("profile.set_shape", self, name, tuple(mn), tuple(opt), tuple(mx))

    class Config:
        def __init__(self) -> None:
            self.profiles: list[Profile] = []
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            rec.add("config.set_memory_pool_limit", pool, size)

        def add_optimization_profile(self, p: Profile) -> int:
            rec.add("config.add_optimization_profile", p)
            self.profiles.append(p)
            return len(self.profiles) - 1

        def set_flag(self, flag: Any) -> None:
            rec.add("config.set_flag", flag)

        def __setattr__(self, key: str, value: Any) -> None:
            if key == "hardware_compatibility_level":
                rec.add("config.hardware_compatibility_level", value)
            object.__setattr__(self, key, value)

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            rec.add("config.create_timing_cache", bytes(blob))
            return TimingCache(blob)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            rec.add("config.set_timing_cache", cache.blob, ignore_mismatch)
            ok = cache_matches or cache.blob == b""
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self) -> TimingCache | None:
            rec.add("config.get_timing_cache")
            return self.cache

    class Network:
        num_layers = 7

        def __init__(self, flags: int) -> None:
            self.flags = flags

        @property
        def num_inputs(self) -> int:
            return len(net_inputs)

        def get_input(self, i: int) -> Any:
            t = net_inputs[i]
            return types.SimpleNamespace(name=t["name"], shape=tuple(t["shape"]))

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            rec.add("Builder", logger)
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            rec.add("builder.create_network", flags)
            return Network(flags)

        def create_builder_config(self) -> Config:
            rec.add("builder.create_builder_config")
            return Config()

        def create_optimization_profile(self) -> Profile:
            rec.add("builder.create_optimization_profile")
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            rec.add("builder.build_serialized_network", network, config)
            self.logger.log(Severity.INFO, "fake builder: nothing was built")
            if not build_ok:
                self.logger.log(Severity.ERROR, "fake builder: out of workspace")
                return None
            return PLAN

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            rec.add("OnnxParser", network, logger)
            self.num_errors = 0 if parse_ok else 2

        def parse_from_file(self, path: str) -> bool:
            rec.add("parser.parse_from_file", path)
            folder = os.path.dirname(path)  # what the real parser would find there: the model and its data
            with open(path, "rb") as f:
                rec.add("parser.saw", sorted(os.listdir(folder)), f.read())
            return parse_ok

        def get_error(self, i: int) -> str:
            return f"fake parser error {i}: unsupported operator"

    class Context:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_optimization_profile_async(self, index: int, stream: int) -> bool:
            rec.add("context.set_optimization_profile_async", index, stream)
            return True

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            rec.add("context.set_input_shape", name, tuple(shape))
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, address: int) -> bool:
            rec.add("context.set_tensor_address", name, int(address))
            self.addresses = getattr(self, "addresses", {})
            self.addresses[name] = int(address)
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            spec = next(t for t in io["outputs"] if t["name"] == name)
            sym = {"batch": self.shapes["input_ids"][0], "seq": self.shapes["input_ids"][1],
                   "total": self.shapes["attention_mask"][1]}
            return tuple(d if isinstance(d, int) else sym[d] for d in spec["shape"])

        def execute_async_v3(self, stream: int) -> bool:
            rec.add("context.execute_async_v3", stream, dict(self.addresses))
            spec = next(t for t in io["outputs"] if t["name"] == "logits")
            pattern = np.arange(np.prod(self.get_tensor_shape("logits")), dtype=_NP[spec["dtype"]]) % 251
            ctypes.memmove(self.addresses["logits"], pattern.ctypes.data, pattern.nbytes)
            return True

    class Engine:
        num_optimization_profiles = 2

        def __init__(self) -> None:
            self.tensors = [(t, TensorIOMode.INPUT) for t in io["inputs"]] + \
                           [(t, TensorIOMode.OUTPUT) for t in io["outputs"]]

        @property
        def num_io_tensors(self) -> int:
            return len(self.tensors)

        def get_tensor_name(self, i: int) -> str:
            return self.tensors[i][0]["name"]

        def get_tensor_mode(self, name: str) -> Any:
            return next(m for t, m in self.tensors if t["name"] == name)

        def get_tensor_dtype(self, name: str) -> Any:
            return next(_DT[t["dtype"]] for t, _ in self.tensors if t["name"] == name)

        def create_execution_context(self) -> Context:
            rec.add("engine.create_execution_context")
            return Context()

    class Runtime:
        def __init__(self, logger: ILogger) -> None:
            rec.add("Runtime", logger)

        def __setattr__(self, key: str, value: Any) -> None:
            rec.add(f"runtime.{key}", value)
            object.__setattr__(self, key, value)

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            rec.add("runtime.deserialize_cuda_engine", bytes(plan))
            return Engine() if bytes(plan) == PLAN else None

    mod = types.ModuleType("tensorrt")
    mod.__version__ = VERSION
    for name, obj in dict(ILogger=ILogger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
                          NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, MemoryPoolType=MemoryPoolType,
                          BuilderFlag=BuilderFlag, HardwareCompatibilityLevel=HardwareCompatibilityLevel,
                          DataType=DataType, TensorIOMode=TensorIOMode).items():
        setattr(mod, name, obj)
    return mod

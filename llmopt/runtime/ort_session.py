"""ONNX Runtime session over an exported decoder, KV cache kept in ONNX Runtime memory.

Each step binds the previous step's ``present.*`` OrtValues as this step's ``past_key_values.*``
inputs (IOBinding): the cache never round-trips through numpy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from llmopt.errors import UserError
from llmopt.models.registry import Dims
from llmopt.runtime.base import DecoderSession

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def default_threads() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover
        return os.cpu_count() or 1


def providers_for(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider"]


def make_session(model_path: Path, device: str = "cpu", threads: int | None = None,
                 config_entries: dict[str, str] | None = None, opt_level: str = "extended"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    so.log_severity_level = 3
    for k, v in (config_entries or {}).items():
        so.add_session_config_entry(k, str(v))
    if device != "cpu":
        if not any(p in ort.get_available_providers() for p in providers_for(device)):
            raise UserError(f"ONNX Runtime here has no {device} provider ({ort.get_available_providers()})",
                            "install llmopt[gpu] (onnxruntime-gpu) on a machine with an NVIDIA GPU")
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        return ort.InferenceSession(str(model_path), sess_options=so, providers=providers_for(device))
    except Exception as exc:  # noqa: BLE001 - ORT raises bare RuntimeError/Fail
        if device != "cpu":
            raise UserError(f"ONNX Runtime could not start on {device}: {str(exc).splitlines()[0][:160]}",
                            "check the GPU driver / CUDA libraries, or build for --device cpu") from None
        raise


class OrtSession(DecoderSession):
    backend = "onnxruntime"

    def __init__(self, model_path: Path, io: dict, device: str = "cpu", threads: int | None = None,
                 config_entries: dict[str, str] | None = None, opt_level: str = "extended") -> None:
        super().__init__()
        import onnxruntime as ort

        self._ort = ort
        self.io = io
        self.dims = Dims(**{k: io[k] for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim",
                                               "hidden_size", "vocab_size")})
        self.device = "cuda" if device != "cpu" else "cpu"
        self.session = make_session(model_path, device, threads, config_entries, opt_level)
        self.kv_dtype = NP_DTYPES[io["kv_dtype"]]
        self.past = [n for pair in io["past_names"] for n in pair]
        self.present = [n for pair in io["present_names"] for n in pair]
        self.binding = self.session.io_binding()
        self._kv: list = []

    def reset(self, batch: int) -> None:
        d = self.dims
        empty = np.zeros((batch, d.num_kv_heads, 0, d.head_dim), self.kv_dtype)
        ov = self._ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0)
        self._kv = [ov] * len(self.past)

    def _step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", positions)):
            b.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(arr, self.device, 0))
        for name, ov in zip(self.past, self._kv):
            b.bind_ortvalue_input(name, ov)
        b.bind_output("logits", "cpu")
        for name in self.present:
            b.bind_output(name, self.device)
        self.session.run_with_iobinding(b)
        outs = b.get_outputs()
        self._kv = list(outs[1:])
        return outs[0].numpy().astype(np.float32, copy=False)

    def io_check(self) -> list[str]:
        """Differences between the session's declared I/O and io.json (names and dtypes)."""
        problems = []
        types = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(float16)": "float16"}
        got = {i.name: types.get(i.type, i.type) for i in self.session.get_inputs()}
        got.update({o.name: types.get(o.type, o.type) for o in self.session.get_outputs()})
        for t in self.io["inputs"] + self.io["outputs"]:
            if t["name"] not in got:
                problems.append(f"{t['name']}: missing from the model")
            elif got[t["name"]] != t["dtype"]:
                problems.append(f"{t['name']}: dtype {got[t['name']]} != io.json {t['dtype']}")
        return problems


def open_ort(directory: Path, threads: int | None = None, device: str | None = None) -> OrtSession:
    """An OrtSession for an `engine` (onnxruntime) or `onnx` artifact directory."""
    io = json.loads((directory / "io.json").read_text())
    settings = {}
    if (directory / "session.json").exists():
        settings = json.loads((directory / "session.json").read_text())
    return OrtSession(directory / "model.onnx", io, device=device or settings.get("device", "cpu"),
                      threads=threads or settings.get("intra_op_num_threads"),
                      config_entries=settings.get("config_entries"),
                      opt_level=settings.get("load_optimization_level", "extended"))

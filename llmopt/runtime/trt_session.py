"""TensorRT session: a built engine behind the shared DecoderSession interface.

I/O buffers are torch CUDA tensors (no pycuda): inputs are copied to the GPU once per step, outputs are
allocated from torch's caching allocator at the shapes TensorRT reports after ``set_input_shape``, and
the ``present`` outputs become the next step's ``past`` inputs without leaving the GPU. Profile 0 serves
prefill (empty cache or several new tokens), profile 1 decode; shapes are set every step, and every
tensor address is set every step (TensorRT needs a non-null address even for an empty past).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmopt.errors import UserError
from llmopt.models.registry import Dims
from llmopt.runtime.base import DecoderSession
from llmopt.trt.compat import ENGINE_FILE, ENGINE_JSON, check_engine_compat
from llmopt.trt.gpu import require_gpu
from llmopt.trt.profiles import Profile, outside, profile_for_step

_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
_FEEDS = ("input_ids", "attention_mask", "position_ids")


def read_engine_json(engine_dir: Path) -> dict:
    path = engine_dir / ENGINE_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{engine_dir}: no {ENGINE_JSON}; not a TensorRT engine artifact",
                        "build one with llmopt build --backend tensorrt") from None
    except ValueError:
        raise UserError(f"{path}: not valid JSON", "rebuild the engine") from None


class TrtSession(DecoderSession):
    """``TrtSession(engine_dir)`` loads ``model.engine`` after checking ``engine.json`` against this machine.

    ``device`` is "cuda" (the only device TensorRT runs on) or "cuda:N"; "cpu" exists only so the call
    sequence can be tested against a fake ``tensorrt`` module on machines without a GPU.
    """

    backend = "tensorrt"

    def __init__(self, engine_dir: Path | str, device: str = "cuda", log: Callable[[str], None] | None = None) -> None:
        super().__init__()
        import torch

        from llmopt.trt import adapter

        self._torch = torch
        self.engine_dir = Path(engine_dir)
        meta = read_engine_json(self.engine_dir)
        self.io: dict = meta["io"]
        io = self.io
        self.dims = Dims(num_layers=io["num_layers"], num_heads=io["num_heads"], num_kv_heads=io["num_kv_heads"],
                         head_dim=io["head_dim"], hidden_size=io.get("hidden_size", io["num_heads"] * io["head_dim"]),
                         vocab_size=io["vocab_size"])
        self.profiles = [Profile.from_json(p) for p in meta["profiles"]]
        self._device = torch.device(device)
        gpu = require_gpu(self._device.index or 0)
        self.warnings = check_engine_compat(meta, adapter.tensorrt_version(), gpu, where=str(self.engine_dir))
        self.log_lines: list[str] = []
        plan = (self.engine_dir / ENGINE_FILE).read_bytes()
        self._loaded = adapter.load_engine(plan, allow_host_code=bool(meta["version_compatible"]),
                                           log=log or self.log_lines.append)
        engine = self._loaded.engine
        self._tensors = {t.name: t for t in adapter.io_tensors(engine)}
        expected = {t["name"] for t in io["inputs"] + io["outputs"]}
        if set(self._tensors) != expected:
            raise UserError(f"{self.engine_dir}: the engine's I/O tensors do not match {ENGINE_JSON}",
                            "rebuild the engine")
        if engine.num_optimization_profiles != len(self.profiles):
            raise UserError(f"{self.engine_dir}: the engine has {engine.num_optimization_profiles} optimization "
                            f"profiles, {ENGINE_JSON} lists {len(self.profiles)}", "rebuild the engine")
        self._pairs = [(tuple(p), tuple(o)) for p, o in zip(io["past_names"], io["present_names"])]
        self._stream = torch.cuda.Stream(device=self._device) if self._device.type == "cuda" else None
        self._context = engine.create_execution_context()
        if self._context is None:
            raise UserError(f"{self.engine_dir}: TensorRT could not create an execution context "
                            f"({self._loaded.sink.last_error or 'out of GPU memory?'})")
        self._profile = 0  # a new context starts on profile 0
        self._past: dict[str, Any] = {}
        self._past_len = 0
        # TensorRT wants a non-null address for every input, even an empty one (past length 0).
        self._dummy = torch.empty(256, dtype=torch.uint8, device=self._device)

    def _dtype(self, name: str) -> Any:
        return getattr(self._torch, _TORCH_DTYPES[self._tensors[name].dtype])

    def _scope(self) -> Any:
        return self._torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    @property
    def _handle(self) -> int:
        return int(self._stream.cuda_stream) if self._stream is not None else 0

    def reset(self, batch: int) -> None:
        kv = (batch, self.dims.num_kv_heads, 0, self.dims.head_dim)
        with self._scope():
            self._past = {n: self._torch.empty(kv, dtype=self._dtype(n), device=self._device)
                          for pair, _ in self._pairs for n in pair}
        self._past_len = 0

    def _step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        torch, ctx = self._torch, self._context
        seq, past, total = ids.shape[1], self._past_len, mask.shape[1]
        if total != past + seq:
            raise ValueError(f"attention mask covers {total} positions, cache {past} + new {seq}")
        index = profile_for_step(past, seq)
        feeds = {n: a for n, a in zip(_FEEDS, (ids, mask, positions)) if n in self._tensors}
        shapes = {n: tuple(a.shape) for n, a in feeds.items()} | {n: tuple(t.shape) for n, t in self._past.items()}
        problem = outside(self.profiles[index], shapes)
        if problem:
            raise UserError(f"{self.engine_dir}: {problem}",
                            "rebuild the engine with a larger envelope (batch, input_len, total_len)")
        with self._scope():
            if index != self._profile:
                if not ctx.set_optimization_profile_async(index, self._handle):
                    raise RuntimeError(f"TensorRT refused optimization profile {index}: {self._last_error()}")
                self._profile = index
            inputs = {n: torch.from_numpy(np.ascontiguousarray(a)).to(self._device, dtype=self._dtype(n))
                      for n, a in feeds.items()}
            inputs.update(self._past)
            for name, t in inputs.items():
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise RuntimeError(f"TensorRT refused shape {tuple(t.shape)} for {name}: {self._last_error()}")
                self._bind(name, t.data_ptr() if t.numel() else self._dummy.data_ptr())
            outputs = {}
            for name, tio in self._tensors.items():
                if tio.is_input:
                    continue
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"TensorRT could not infer the shape of output {name}: {shape}")
                outputs[name] = torch.empty(shape, dtype=self._dtype(name), device=self._device)
                self._bind(name, outputs[name].data_ptr())
            if not ctx.execute_async_v3(self._handle):
                raise RuntimeError(f"TensorRT execute_async_v3 failed: {self._last_error()}")
            logits = outputs["logits"].float().cpu().numpy()
            if self._stream is not None:
                self._stream.synchronize()
        self._past = {p: outputs[o] for ps, os_ in self._pairs for p, o in zip(ps, os_)}
        self._past_len = total
        return logits

    def _bind(self, name: str, address: int) -> None:
        if not self._context.set_tensor_address(name, address):
            raise RuntimeError(f"TensorRT refused the address of {name}: {self._last_error()}")

    def _last_error(self) -> str:
        return self._loaded.sink.last_error or "no error reported"

    def close(self) -> None:
        self._past = {}
        self._context = None
        self._loaded = None  # type: ignore[assignment]

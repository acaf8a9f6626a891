"""ONNX Runtime session over an exported decoder, KV cache kept in ONNX Runtime memory.

Two graph forms, told apart by io.json:

* standard (the export as is): each step binds the previous step's ``present.*`` OrtValues as this
  step's ``past_key_values.*`` inputs (IOBinding), so the cache never round-trips through numpy; the
  graph itself still concatenates past + new into a new present every step.
* ``"attention": "gqa"`` (the ORT build's GroupQueryAttention rewrite): one preallocated OrtValue of
  ``kv_capacity`` positions per layer and K/V is bound once per generation as both past input and
  present output; GroupQueryAttention writes the new position in place and reads the cache where it
  is. The graph takes ONNX Runtime GenAI's inputs (``input_ids``, ``attention_mask``, past → logits,
  present) and wants right-padded rows (each row's tokens from cache position 0): it reads each row's
  length from the mask (row sum) and the longest from its width. A left-padded prompt batch is compacted
  here (the tokens whose mask is 1, in order: the same positions and visibility as the left-padded
  reference) and its logits are put back in the caller's layout. ``run_rows`` is the step underneath.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from llmopt.errors import UserError
from llmopt.models.registry import Dims
from llmopt.runtime.base import DecoderSession

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


def default_threads() -> int:
    """Intra-op threads: the physical cores this process may run on.

    Decode is memory-bound and prefill is FMA/int8-dot bound; SMT siblings share both, so a second
    thread per core adds contention, not throughput. A CPU affinity mask or a smaller container
    (``sched_getaffinity``) caps the count.
    """
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover
        physical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        allowed = physical
    return max(1, min(physical, allowed))


def providers_for(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider"]


def make_session(model_path: Path, device: str = "cpu", threads: int | None = None,
                 config_entries: dict[str, str] | None = None, opt_level: str = "extended",
                 profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
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
        self._open_args = (model_path, device, threads, config_entries, opt_level)
        self.session = make_session(*self._open_args)
        self.kv_dtype = NP_DTYPES[io["kv_dtype"]]
        self.past = [n for pair in io["past_names"] for n in pair]
        self.present = [n for pair in io["present_names"] for n in pair]
        self.binding = self.session.io_binding()
        self._kv: list = []

    def reopen(self, profile_prefix: str | None = None) -> None:
        """Open the model again (e.g. with ONNX Runtime's profiler on); the cache starts empty."""
        self.session = self.binding = None  # release the old weights before loading them again
        self.session = make_session(*self._open_args, profile_prefix=profile_prefix)
        self.binding = self.session.io_binding()
        self._mask = None

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
        types = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32", "tensor(float16)": "float16",
                 "tensor(int8)": "int8"}
        got = {i.name: types.get(i.type, i.type) for i in self.session.get_inputs()}
        got.update({o.name: types.get(o.type, o.type) for o in self.session.get_outputs()})
        for t in self.io["inputs"] + self.io["outputs"]:
            if t["name"] not in got:
                problems.append(f"{t['name']}: missing from the model")
            elif got[t["name"]] != t["dtype"]:
                problems.append(f"{t['name']}: dtype {got[t['name']]} != io.json {t['dtype']}")
        return problems


class OrtGqaSession(OrtSession):
    """The GroupQueryAttention graph: KV buffers allocated and bound once, written in place."""

    def __init__(self, model_path: Path, io: dict, device: str = "cpu", threads: int | None = None,
                 config_entries: dict[str, str] | None = None, opt_level: str = "extended") -> None:
        super().__init__(model_path, io, device, threads, config_entries, opt_level)
        self.capacity = int(io["kv_capacity"])
        self.cache_dtype = NP_DTYPES[io.get("kv_cache_dtype", io["kv_dtype"])]  # int8: GQA's quantized cache
        self.kv_buffers: list = []      # one OrtValue per past/present pair, [batch, kv_heads, capacity, head_dim]
        self._lengths: np.ndarray | None = None
        self._prompt = False
        self._logits = None
        self._ids = None     # the bound input_ids OrtValue, reused while its shape holds
        self._mask_ov = None  # the attention_mask bound for the current step (its width grows every step)
        self._logits_shape: list[int] | None = None
        self._window = io.get("logits_window")  # the input choosing the positions the lm_head runs on
        self._window_ovs = {}

    def reopen(self, profile_prefix: str | None = None) -> None:
        super().reopen(profile_prefix)
        self.kv_buffers, self._ids, self._logits_shape = [], None, None  # bound to the old binding: bind again

    def reset(self, batch: int) -> None:
        d = self.dims
        if not self.kv_buffers or self.kv_buffers[0].shape()[0] != batch:
            shape = [batch, d.num_kv_heads, self.capacity, d.head_dim]
            self.kv_buffers = [self._ort.OrtValue.ortvalue_from_shape_and_type(shape, self.cache_dtype, self.device, 0)
                               for _ in self.past]
            b = self.binding
            b.clear_binding_inputs()
            b.clear_binding_outputs()
            self._ids = self._logits_shape = None
            for past, present, ov in zip(self.past, self.present, self.kv_buffers):
                b.bind_ortvalue_input(past, ov)
                b.bind_ortvalue_output(present, ov)
        # stale positions need no clearing: a row only ever reads cache positions it has written
        self._lengths = None
        self._prompt = True

    def run_rows(self, ids: np.ndarray, lengths: np.ndarray, last_only: bool = False) -> np.ndarray:
        """The low-level step over the bound KV buffers (continuous batching builds on this).

        ``ids [batch, seq]``: each row's new tokens, right-padded; ``lengths [batch]``: each row's tokens
        in the cache *after* this step (its cache length before + its new tokens). A row's tokens occupy
        cache positions 0..length-1 and the new ones are written at the end, in place. All rows of one
        call add ``seq`` tokens, except a first prompt (every cache empty), where rows may be shorter
        than ``seq``. Returns logits [batch, seq, vocab] in a buffer the next call overwrites; with
        ``last_only`` (for rows that all end at the last column) [batch, 1, vocab], the lm_head run for
        that position alone where the engine has the window input (older engines: sliced here).

        The graph reads the lengths from ``attention_mask`` as ONNX Runtime GenAI feeds it: row sum =
        length, width = the longest row.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        total = int(lengths.max())
        if total > self.capacity:
            raise UserError(f"context of {total} tokens exceeds this engine's KV capacity of {self.capacity}",
                            "rebuild with a larger envelope total_len max (llmopt build --total-len MIN,OPT,MAX)")
        b, ov = self.binding, self._ort.OrtValue
        mask = (np.arange(total)[None, :] < lengths[:, None]).astype(np.int64)
        self._mask_ov = ov.ortvalue_from_shape_and_type(list(mask.shape), np.int64, "cpu", 0)  # ORT-owned, filled by copy
        self._mask_ov.update_inplace(mask)
        b.bind_ortvalue_input("attention_mask", self._mask_ov)
        if self._ids is not None and self._ids.shape() == list(ids.shape):
            self._ids.update_inplace(np.ascontiguousarray(ids, dtype=np.int64))  # decode: same OrtValue, new contents
        else:  # a new shape (prompt, or the first decode step): bind fresh ids
            self._ids = ov.ortvalue_from_shape_and_type(list(ids.shape), np.int64, "cpu", 0)
            self._ids.update_inplace(np.ascontiguousarray(ids, dtype=np.int64))
            b.bind_ortvalue_input("input_ids", self._ids)
        window = last_only and self._window is not None and ids.shape[1] > 1
        if self._window is not None:
            start = -1 if window else 0
            if start not in self._window_ovs:  # (the array kept beside the OrtValue that views it)
                arr = np.array([start], np.int64)
                self._window_ovs[start] = (arr, ov.ortvalue_from_numpy(arr))
            b.bind_ortvalue_input(self._window, self._window_ovs[start][1])
        shape = [ids.shape[0], 1 if window else ids.shape[1], self.dims.vocab_size]
        if shape != self._logits_shape:
            self._logits = ov.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cpu", 0)
            self._logits_shape = shape
            b.bind_ortvalue_output("logits", self._logits)
        self.session.run_with_iobinding(b)
        logits = self._logits.numpy()
        return logits[:, -1:] if last_only else logits

    def _step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if not self._prompt:  # decode: one new token per row, appended at each row's own length
            self._lengths = self._lengths + 1
            return self.run_rows(ids, self._lengths).astype(np.float32, copy=False)
        self._prompt = False
        keep = mask.astype(bool)
        lengths = keep.sum(axis=1)
        if (lengths == 0).any():
            raise ValueError("a prompt row has no token with attention_mask 1")
        self._lengths = lengths.astype(np.int64)
        if keep.all():
            return self.run_rows(ids, self._lengths, self._last_only).astype(np.float32, copy=False)
        width = int(lengths.max())
        compact = np.zeros((ids.shape[0], width), np.int64)
        for r in range(ids.shape[0]):
            compact[r, :lengths[r]] = ids[r, keep[r]]
        logits = self.run_rows(compact, self._lengths)
        if self._last_only:  # a left-padded row ends at the last column: its last real token
            return logits[np.arange(ids.shape[0]), lengths - 1][:, None].astype(np.float32)
        out = np.zeros((*ids.shape, logits.shape[-1]), np.float32)
        for r in range(ids.shape[0]):
            out[r, keep[r]] = logits[r, :lengths[r]]
        return out


def open_ort(directory: Path, threads: int | None = None, device: str | None = None) -> OrtSession:
    """An OrtSession for an `engine` (onnxruntime) or `onnx` artifact directory."""
    io = json.loads((directory / "io.json").read_text())
    settings = {}
    if (directory / "session.json").exists():
        settings = json.loads((directory / "session.json").read_text())
    if any(t["name"] == "seqlens_k" for t in io["inputs"]):
        raise UserError(f"{directory}: built by an older llmopt (seqlens_k / total_sequence_length inputs)",
                        "rebuild it with llmopt build (the graph now takes attention_mask, as ONNX Runtime GenAI feeds it)")
    cls = OrtGqaSession if io.get("attention") == "gqa" else OrtSession
    return cls(directory / "model.onnx", io, device=device or settings.get("device", "cpu"),
               threads=threads or settings.get("intra_op_num_threads"), config_entries=settings.get("config_entries"),
               opt_level=settings.get("load_optimization_level", "extended"))

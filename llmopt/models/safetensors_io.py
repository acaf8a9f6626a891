"""Checkpoint tensors read and written one at a time, so peak memory is one tensor, not the model.

* :class:`SafetensorsReader` — the tensors of a checkpoint directory (``model.safetensors``, or the shards
  named by ``model.safetensors.index.json``) by name: shape and dtype from the headers, data on request
  through ``safe_open`` (one file mapped at a time).
* :class:`CheckpointWriter` — writes a planned set of tensors as one ``model.safetensors`` or as
  hub-style shards with an index. The safetensors library only serializes a complete dict of tensors, so
  the writer lays out each file's header from the plan (names, dtypes, shapes, the library's format:
  8-byte little-endian header length, JSON header padded to 8 bytes, packed data) and then writes each
  tensor at its offset as it is produced, in any order. Files are read back with ``safe_open``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from llmopt.errors import UserError
from llmopt.paths import safe_join

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards (names kept inside the directory) or
    every ``*.safetensors``; empty when there are none."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: not a valid safetensors index (needs weight_map)") from None
        files = [safe_join(directory, s, "shard name") for s in shards]
        missing = [s for s, f in zip(shards, files) if not f.exists()]
        if missing:
            raise UserError(f"{directory}: shard {missing[0]} listed in the index is missing")
        return files
    return sorted(directory.glob("*.safetensors"))


class SafetensorsReader:
    """name → (shape, dtype) from the headers; :meth:`get` reads one tensor."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {}
        for f in files:
            with self._open(f) as sf:
                for name in sf.keys():
                    sl = sf.get_slice(name)
                    st = sl.get_dtype()
                    self._where[name] = f
                    self._info[name] = (tuple(sl.get_shape()), ST_DTYPES.get(st, st))

    @staticmethod
    def _open(f: Path):  # noqa: ANN205
        try:
            return safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{f}: corrupt safetensors file ({_first_line(exc)})",
                            "re-download or re-save the checkpoint") from None

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        """Shape and dtype (a torch dtype, or the safetensors name of one torch cannot hold here)."""
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now. The file is mapped for this read only: a mapping kept open would count
        every page read so far in the process's RSS (a 13.5 GB single-file checkpoint, read to the end,
        would show 13.5 GB resident); reopening costs a header parse (well under a millisecond)."""
        f = self._where[name]
        try:
            with self._open(f) as sf:
                return sf.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{f}: corrupt safetensors file ({_first_line(exc)})",
                            "re-download or re-save the checkpoint") from None


class _FileWriter:
    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None) -> None:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self.offsets: dict[str, tuple[int, TensorSpec]] = {}
        pos = 0
        for s in specs:
            if s.dtype not in ST_NAMES:
                raise ValueError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors here")
            header[s.name] = {"dtype": ST_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
            self.offsets[s.name] = (pos, s)
            pos += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.start = 8 + len(raw)
        self.path = path
        self.f = open(path, "wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.f.truncate(self.start + pos)
        self.pending = set(self.offsets)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        off, spec = self.offsets[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: planned {spec.dtype} {spec.shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        if name not in self.pending:
            raise ValueError(f"{name}: written twice")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.f.seek(self.start + off)
        self.f.write(memoryview(data))
        self.pending.discard(name)

    def close(self) -> None:
        self.f.close()


class CheckpointWriter:
    """Write planned tensors into ``model.safetensors`` or, above ``max_shard_bytes``, hub-style shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Use as a context manager;
    :meth:`close` fails when a planned tensor was never written."""

    def __init__(self, out_dir: Path, plan: Iterable[TensorSpec], max_shard_bytes: int | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        plan = list(plan)
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in plan:
            if max_shard_bytes and shards[-1] and size + s.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        n = len(shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.out_dir = Path(out_dir)
        self.files = [self.out_dir / nm for nm in names]
        self.total = sum(s.nbytes for s in plan)
        self._writers = [_FileWriter(f, sh, metadata) for f, sh in zip(self.files, shards)]
        self._by_name = {s.name: w for w, sh in zip(self._writers, shards) for s in sh}
        self._weight_map = {s.name: nm for nm, sh in zip(names, shards) for s in sh}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._by_name[name].write(name, tensor)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        pending = sorted(n for w in self._writers for n in w.pending)
        if pending:
            raise RuntimeError(f"planned tensors never written: {pending[:3]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self._weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            self.close()
        else:
            for w in self._writers:
                w.close()

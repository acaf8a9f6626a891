"""Checkpoint tensors read and written one at a time, so peak memory is one tensor, not the model.

* :class:`SafetensorsReader` — the tensors of a checkpoint directory (``model.safetensors``, or the shards
  named by ``model.safetensors.index.json``) by name: shape and dtype from the headers (checked against
  the file's size), data on request through ``safe_open`` (one file mapped per read). Load, quantize,
  export and the reference model all read through it.
* :class:`CheckpointWriter` — writes a planned set of tensors as one ``model.safetensors`` or as
  hub-style shards with an index. The safetensors library only serializes a complete dict of tensors, so
  the writer lays out each file's header from the plan (names, dtypes, shapes, the library's format:
  8-byte little-endian header length, JSON header padded to 8 bytes, packed data) and then writes each
  tensor at its offset as it is produced, in any order. Files are read back with ``safe_open``.
"""

from __future__ import annotations

import json
import math
import struct
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
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


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


@dataclass(frozen=True)
class TensorInfo:
    """Where a stored tensor is and what it is, from its file's header."""

    file: Path
    dtype: str                  # safetensors dtype name (BF16, F32, U8, ...)
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype | str:
        """The torch dtype, or the safetensors name of one torch cannot hold here."""
        return ST_DTYPES.get(self.dtype, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEM_BYTES.get(self.dtype, 4)


def _corrupt(f: Path, exc: BaseException) -> UserError:
    return UserError(f"{f}: corrupt safetensors file ({_first_line(exc)})", "re-download or re-save the checkpoint")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """name → :class:`TensorInfo` from a safetensors file's header (8-byte length + JSON); no data is read.
    Each tensor's byte range must lie inside the file and match its dtype and shape."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        size = path.stat().st_size
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            info = TensorInfo(path, entry["dtype"], tuple(int(d) for d in entry["shape"]))
            begin, stop = entry["data_offsets"]
            if stop + 8 + n > size:
                raise ValueError(f"tensor {name} runs past the end of the file")
            if info.dtype in ITEM_BYTES and stop - begin != info.nbytes:
                raise ValueError(f"tensor {name} holds {stop - begin} bytes, {info.dtype} {info.shape} needs "
                                 f"{info.nbytes}")
            out[name] = info
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise _corrupt(path, exc) from None


class SafetensorsReader:
    """Every tensor of a (sharded) safetensors checkpoint by name: shape and dtype from the headers, data
    only on :meth:`get`. The one reader of load, quantize, export and the reference model."""

    def __init__(self, files: list[Path]) -> None:
        self.files = list(files)
        self.directory = self.files[0].parent if self.files else Path()
        self.entries: dict[str, TensorInfo] = {}
        for f in self.files:
            self.entries.update(read_header(f))

    @classmethod
    def of(cls, directory: Path) -> "SafetensorsReader":
        """The reader of a checkpoint directory (``llmopt load`` writes safetensors; pickle is refused)."""
        directory = Path(directory)
        files = checkpoint_files(directory)
        if not files:
            if any(directory.glob("pytorch_model*.bin")):
                raise UserError(f"{directory}: the streaming stages read safetensors, not pickle weights",
                                "convert the checkpoint with `llmopt load` first")
            raise UserError(f"{directory}: no weights (*.safetensors or pytorch_model*.bin)")
        return cls(files)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        """Shape and dtype (a torch dtype, or the safetensors name of one torch cannot hold here)."""
        e = self.entries[name]
        return e.shape, e.torch_dtype

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now. The file is mapped for this read only: a mapping kept open would count
        every page read so far in the process's RSS (a 13.5 GB single-file checkpoint, read to the end,
        would show 13.5 GB resident); reopening costs a header parse (well under a millisecond)."""
        f = self.entries[name].file
        try:
            with safe_open(str(f), framework="pt") as sf:
                return sf.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _corrupt(f, exc) from None


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

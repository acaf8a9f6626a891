"""The checkpoint's tensors, read one at a time: names, shapes and dtypes come from the safetensors
headers; a tensor's bytes are read only when its ONNX initializer is written."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from llmopt.errors import UserError
from llmopt.models.loader import weight_files

# safetensors dtype names → bytes per element
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str          # safetensors dtype name (BF16, F32, U8, ...)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEM_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (dtype, shape) from a safetensors file's header (8-byte length + JSON); no data is read."""
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
            if entry["data_offsets"][1] + 8 + n > size:
                raise ValueError(f"tensor {name} runs past the end of the file")
            out[name] = (entry["dtype"], tuple(entry["shape"]))
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise UserError(f"{path}: corrupt safetensors file ({str(exc).splitlines()[0][:120]})",
                        "re-download or re-save the checkpoint") from None


class CheckpointTensors:
    """Every tensor of an HF-layout checkpoint directory (one file or shards with an index), lazily."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.info: dict[str, TensorInfo] = {}
        for f in weight_files(self.directory):
            if f.suffix != ".safetensors":
                raise UserError(f"{f}: the streaming stages read safetensors, not pickle weights",
                                "convert the checkpoint with `llmopt load` first")
            for name, (dtype, shape) in read_header(f).items():
                self.info[name] = TensorInfo(f, dtype, shape)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file now (nothing is cached)."""
        with safe_open(str(self.info[name].file), framework="pt") as sf:
            return sf.get_tensor(name)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.info.values())

"""Reading files users hand us: library parse errors become one-line UserErrors naming the file.

Use at the boundary where a user file is read (a config, a tokenizer, ONNX protobuf, io.json, weights).
Only the libraries' *parse/format* errors are translated; anything else keeps its traceback (a bug).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from llmopt.errors import UserError, environment_error


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def parse_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'this file does not parse' in the libraries llmopt reads files with."""
    found: list[type[BaseException]] = [json.JSONDecodeError, UnicodeDecodeError]
    try:
        from google.protobuf.message import DecodeError

        found.append(DecodeError)
    except ImportError:
        pass
    try:
        from safetensors import SafetensorError

        found.append(SafetensorError)
    except ImportError:
        pass
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        found += [ort_state.Fail, ort_state.InvalidProtobuf, ort_state.InvalidGraph, ort_state.NoSuchFile,
                  ort_state.InvalidArgument, ort_state.NotImplemented, ort_state.RuntimeException]
    except ImportError:
        pass
    try:
        from onnx.checker import ValidationError

        found.append(ValidationError)
    except ImportError:
        pass
    return tuple(found)


@contextmanager
def reading(path: Path, what: str, hint: str | None = None) -> Iterator[None]:
    """Turn a parse error raised while reading ``path`` into ``UserError("<path>: <what> cannot be read ...")``."""
    try:
        yield
    except parse_errors() as exc:
        env = environment_error(exc)  # a library's write error for a full disk is not a bad input
        if env is not None:
            raise env from None
        raise UserError(f"{path}: {what} cannot be read ({type(exc).__name__}: {_first_line(exc)})",
                        hint or "the file is corrupt or not what llmopt wrote; rebuild or re-download it") from None


def read_json(path: Path, what: str, expect: type = dict) -> Any:
    """Parse a JSON file that must hold a ``expect`` (dict or list)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} is missing")
    if not path.is_file():
        raise UserError(f"{path}: {what} is not a file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({_first_line(exc)})") from None
    except OSError as exc:
        raise UserError(f"{path}: {what} cannot be read ({exc.strerror})") from None
    if not isinstance(data, expect):
        raise UserError(f"{path}: {what} must be a JSON {'object' if expect is dict else 'array'}, "
                        f"not {type(data).__name__}")
    return data


def check_io_json(directory: Path) -> dict:
    """io.json of an onnx/engine artifact, with the fields every reader relies on."""
    path = Path(directory) / "io.json"
    io = read_json(path, "io.json")
    for key in ("inputs", "outputs"):
        items = io.get(key)
        if not isinstance(items, list) or not items or not all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("shape"), list)
                and isinstance(t.get("dtype"), str) for t in items):
            raise UserError(f"{path}: io.json '{key}' must be a list of {{name, dtype, shape}}",
                            "the artifact is corrupt; rerun the export")
    for key in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
        if key in io and not (isinstance(io[key], int) and io[key] > 0):
            raise UserError(f"{path}: io.json '{key}' must be a positive integer", "the artifact is corrupt; rerun the export")
    return io

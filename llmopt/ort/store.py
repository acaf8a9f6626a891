"""Where the ONNX Runtime rewrites read initializer data and put the initializers they make.

The build loads the exported graph WITHOUT its weights (``onnx.load(..., load_external_data=False)``):
an initializer's data is read from the external-data file only when a rewrite needs its values (packing
q/k/v, quantizing the lm_head), and every large initializer a rewrite makes is appended to the output's
external-data file at once, so the build holds a few tensors, not the model. Without a directory (tests,
small in-memory graphs) the store keeps everything in the protos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, numpy_helper

ALIGN = 4096       # page-aligned offsets let ONNX Runtime map the data instead of copying it
MIN_EXTERNAL = 1024


class TensorStore:
    def __init__(self, base_dir: Path | None = None, out_file: Path | None = None) -> None:
        self.base_dir = base_dir
        self.out_file = out_file
        self._offset = 0
        if out_file is not None:
            out_file.write_bytes(b"")

    def array(self, t: TensorProto) -> np.ndarray:
        """An initializer's values, read from its external file when it has one (the proto is not changed)."""
        return numpy_helper.to_array(t, base_dir=str(self.base_dir) if self.base_dir is not None else "")

    def tensor(self, arr: np.ndarray, name: str) -> TensorProto:
        """A new initializer; a large one is written to the output's external data now."""
        t = numpy_helper.from_array(arr, name)
        if self.out_file is None or len(t.raw_data) < MIN_EXTERNAL:
            return t
        data = t.raw_data
        offset = -(-self._offset // ALIGN) * ALIGN
        with open(self.out_file, "r+b") as f:
            f.seek(offset)
            f.write(data)
        self._offset = offset + len(data)
        external_data_helper.set_external_data(t, location=self.out_file.name, offset=offset, length=len(data))
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        return t


IN_MEMORY = TensorStore()


def relocate(model: onnx.ModelProto, old: str, new: str) -> int:
    """Point every external initializer stored in ``old`` at ``new`` (same bytes, another file name)."""
    n = 0
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
                n += 1
    return n

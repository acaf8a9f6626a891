"""Measurements shared by the bench parent and its workers: RSS, memory bandwidth, weight bytes per token."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def peak_rss_mb() -> tuple[float, float]:
    """(peak, current) resident set size of this process in MB (VmHWM / VmRSS on Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):  # pragma: no cover - not Linux
        import resource

        import psutil

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, psutil.Process().memory_info().rss / 2**20


def read_bandwidth_gbs(threads: int, mbytes: int = 1024, passes: int = 5) -> dict:
    """Read (sum) and copy bandwidth of main memory with ``threads`` threads, best of ``passes``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.rand(mbytes * 2**20 // 4, dtype=torch.float32)  # distinct pages: no deduplicated reads
        y = torch.empty_like(x)
        read, copy = [], []
        for _ in range(passes):
            t = time.perf_counter()
            x.sum()
            read.append(time.perf_counter() - t)
            t = time.perf_counter()
            y.copy_(x)
            copy.append(time.perf_counter() - t)
        nbytes = x.numel() * 4
        return {"read_gbs": round(nbytes / min(read) / 1e9, 2), "copy_gbs": round(2 * nbytes / min(copy) / 1e9, 2),
                "buffer_mb": mbytes, "threads": threads}
    finally:
        torch.set_num_threads(old)


def onnx_weight_bytes(model_path: Path) -> int:
    """Bytes of initializers one decode step reads: all of them, but one row of a Gather's table."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    other = {i for n in model.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for i in n.input}
    total = 0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims)) if t.dims else 1
        nbytes = size * _ELEM_BYTES.get(t.data_type, 4)
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            nbytes = (size + 1) // 2
        if t.name in gathered and t.name not in other and t.dims:
            nbytes //= t.dims[0]
        total += nbytes
    return total


_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}


def torch_weight_bytes(model: Any) -> int:
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if head is None or head.weight is not emb:  # the table is only gathered: one row per token
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return int(total)

"""Facts about the CUDA GPU, read through torch (no pycuda, no tensorrt)."""

from __future__ import annotations

from dataclasses import dataclass

from llmopt.errors import UserError

INSTALL_HINT = "install llmopt[gpu] on a machine with an NVIDIA GPU: pip install 'llmopt[gpu]' " \
               "--extra-index-url https://pypi.nvidia.com"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "major.minor", e.g. "9.0"

    def to_json(self) -> dict:
        return {"name": self.name, "compute_capability": self.compute_capability}


def current_gpu(index: int = 0) -> GpuInfo | None:
    """The CUDA device torch sees at ``index``, or None without a usable CUDA GPU."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
            return None
        major, minor = torch.cuda.get_device_capability(index)
        return GpuInfo(torch.cuda.get_device_name(index), f"{major}.{minor}")
    except (RuntimeError, AssertionError):  # a CPU-only build or a broken driver
        return None


def require_gpu(index: int = 0) -> GpuInfo:
    gpu = current_gpu(index)
    if gpu is None:
        raise UserError("no CUDA GPU is available (TensorRT engines build and run only on an NVIDIA GPU)",
                        INSTALL_HINT)
    return gpu

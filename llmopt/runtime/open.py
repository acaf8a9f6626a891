"""Open the right session for an artifact: checkpoint → PyTorch, onnx/engine → ONNX Runtime or TensorRT."""

from __future__ import annotations

from llmopt.artifact import Artifact
from llmopt.runtime.base import DecoderSession


def backend_of(artifact: Artifact) -> str:
    if artifact.kind == "checkpoint":
        return "torch"
    if artifact.kind == "engine":
        return artifact.metadata.get("backend", "onnxruntime")
    return "onnxruntime"


def open_session(artifact: Artifact, threads: int | None = None) -> DecoderSession:
    """A session over the artifact; a file that does not parse is a UserError naming the artifact."""
    from llmopt.readers import check_io_json, reading

    backend = backend_of(artifact)
    if backend != "torch":
        check_io_json(artifact.path)
    with reading(artifact.path, f"{artifact.kind} artifact"):
        return _open(artifact, backend, threads)


def _open(artifact: Artifact, backend: str, threads: int | None) -> DecoderSession:
    if backend == "torch":
        import torch

        from llmopt.models.loader import load_model
        from llmopt.runtime.torch_session import TorchSession

        if threads:
            torch.set_num_threads(threads)
        model, _ = load_model(artifact.path)
        return TorchSession(model)
    if backend == "tensorrt":
        from llmopt.runtime.trt_session import TrtSession

        return TrtSession(artifact.path)
    from llmopt.runtime.ort_session import open_ort

    return open_ort(artifact.path, threads=threads)


def artifact_bytes(artifact: Artifact) -> int:
    return sum(f["bytes"] for name, f in artifact.manifest.get("files", {}).items()
               if name.endswith((".onnx", ".data", ".engine", ".safetensors")))

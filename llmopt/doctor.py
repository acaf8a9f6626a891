"""doctor: what this machine can run. Never imports tensorrt at module import time."""

from __future__ import annotations

import platform

from rich.console import Console

from llmopt.artifact import environment, package_version


def ort_providers() -> dict:
    """Providers ONNX Runtime lists, and which of them actually start a session."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"installed": False, "error": str(exc)}
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    blob = model.SerializeToString()
    working = {}
    for p in ort.get_available_providers():
        so = ort.SessionOptions()
        so.log_severity_level = 4
        if p != "CPUExecutionProvider":
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:
            s = ort.InferenceSession(blob, sess_options=so, providers=[p])
            working[p] = p in s.get_providers()
        except Exception as exc:  # noqa: BLE001 - any failure means "does not load"
            working[p] = f"fails: {str(exc).splitlines()[0][:100]}"
    del onnx
    return {"installed": True, "version": ort.__version__, "available": ort.get_available_providers(), "loads": working}


def tensorrt_info() -> dict:
    try:
        from llmopt.trt.adapter import tensorrt_status
    except ImportError:  # adapter not present in this build
        return {"importable": package_version("tensorrt") is not None}
    return tensorrt_status()


def gpu_info() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            return {"present": True, "name": torch.cuda.get_device_name(0),
                    "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    except Exception as exc:  # noqa: BLE001
        return {"present": False, "error": str(exc)}
    return {"present": False}


def diagnose() -> dict:
    return {"environment": environment(), "machine": platform.machine(), "onnxruntime": ort_providers(),
            "tensorrt": tensorrt_info(), "gpu": gpu_info()}


def render(info: dict, console: Console) -> None:
    out = console.print
    console = _Plain(out)  # type: ignore[assignment]
    env = info["environment"]
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("platform",)))
    ort_ = info["onnxruntime"]
    if ort_.get("installed"):
        for p, ok in ort_["loads"].items():
            console.print(f"{'✓' if ok is True else '✗'} onnxruntime {p}" + ("" if ok is True else f" ({ok})"))
    else:
        console.print("✗ onnxruntime not installed (pip install 'llmopt[cpu]')")
    trt = info["tensorrt"]
    console.print(f"{'✓' if trt.get('importable') else '✗'} tensorrt "
                  + (str(trt.get("version")) if trt.get("importable") else "not installed (pip install 'llmopt[gpu]')"))
    gpu = info["gpu"]
    console.print(f"{'✓' if gpu.get('present') else '✗'} GPU " + (gpu.get("name", "") if gpu.get("present") else "none"))


class _Plain:
    """Print without rich markup (install hints contain brackets)."""

    def __init__(self, fn) -> None:  # noqa: ANN001
        self.fn = fn

    def print(self, text: str) -> None:
        self.fn(text, markup=False, highlight=False)

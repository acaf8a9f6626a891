"""build (onnxruntime): an offline-optimized ONNX model ONNX Runtime loads fast, plus session.json."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from llmopt.artifact import Artifact
from llmopt.progress import Progress
from llmopt.recipe import BuildConfig
from llmopt.runtime.ort_session import default_threads, make_session

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def session_settings(config: BuildConfig, io: dict) -> dict:
    """What OrtSession applies at load, recorded so every consumer runs the same configuration."""
    entries: dict[str, str] = {}
    if io.get("quantization"):
        entries["session.qdq_matmulnbits_accuracy_level"] = str(config.accuracy_level)
    return {
        "device": config.device,
        "intra_op_num_threads": config.threads or default_threads(),
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",
        "config_entries": entries,
        # the saved graph is already optimized offline; at load only cheap passes run again
        "load_optimization_level": "basic",
    }


def optimize_offline(src: Path, dst: Path, config: BuildConfig, entries: dict[str, str]) -> None:
    """Let ONNX Runtime apply its graph optimizations once and save the result (external data)."""
    opt = {
        "session.optimized_model_external_initializers_file_name": DATA_FILE,
        "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
        **entries,
    }
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    for k, v in opt.items():
        so.add_session_config_entry(k, v)
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


def run(config: BuildConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    onnx_art = inputs[0]
    io = json.loads((onnx_art.path / "io.json").read_text())
    settings = session_settings(config, io)
    with progress.task("optimize graph (ONNX Runtime, offline)"):
        if config.device == "cpu":
            optimize_offline(onnx_art.path / MODEL_FILE, out / MODEL_FILE, config, settings["config_entries"])
        else:  # CUDA kernels fuse at load; the portable graph is kept as is
            shutil.copy2(onnx_art.path / MODEL_FILE, out / MODEL_FILE)
            shutil.copy2(onnx_art.path / DATA_FILE, out / DATA_FILE)
    shutil.copy2(onnx_art.path / "io.json", out / "io.json")
    (out / "session.json").write_text(json.dumps(settings, indent=2))
    with progress.task("check the session loads"):
        t0 = time.perf_counter()
        make_session(out / MODEL_FILE, config.device, settings["intra_op_num_threads"], settings["config_entries"],
                     settings["load_optimization_level"])
        load_s = time.perf_counter() - t0
    import onnx

    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"backend": "onnxruntime", "device": config.device, "session": settings, "load_s": round(load_s, 3),
            "nodes": len(graph.graph.node), "op_types": dict(sorted(ops.items()))}

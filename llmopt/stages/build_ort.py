"""build (onnxruntime): the graph rewritten for ONNX Runtime, written one tensor at a time, plus session.json.

For the CPU the exported graph is first rewritten for ONNX Runtime (llmopt.ort): attention
becomes GroupQueryAttention over a KV buffer of the envelope's total_len max (``attention: auto|gqa``),
residual + RMSNorm becomes SkipSimplifiedLayerNormalization, and a float lm_head can become MatMulNBits
(``quantize_lm_head``), and the cache can be stored as int8 with per-channel scales calibrated here on the
float graph (``kv_cache: int8``, llmopt.ort.kv_cache). io.json is rewritten to the graph's I/O. The ONNX
artifact itself is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from llmopt.artifact import Artifact, lineage
from llmopt.errors import UserError
from llmopt.progress import Progress
from llmopt.recipe import BuildConfig
from llmopt.runtime.ort_session import default_threads, make_session

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
REWRITTEN = "rewritten.onnx"  # intermediate, removed once the engine is written
SOURCE_DATA = "source.onnx.data"  # the export's external data, linked beside the intermediate graph


def session_settings(config: BuildConfig, io: dict) -> dict:
    """What OrtSession applies at load, recorded so every consumer runs the same configuration."""
    entries: dict[str, str] = {}
    if io.get("quantization"):
        entries["session.qdq_matmulnbits_accuracy_level"] = str(config.accuracy_level)
    return {
        "device": config.device,
        # None: physical cores of the machine that loads the engine (resolved at load, not frozen at build)
        "intra_op_num_threads": config.threads,
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",
        "config_entries": entries,
        # ONNX Runtime's own fusions (DQ→MatMulNBits, ...) run at load: cheaper in memory than offline (save_engine)
        "load_optimization_level": "extended",
    }


def save_engine(src: Path, onnx_dir: Path, dst: Path, progress: Progress) -> None:
    """Write the rewritten graph as the engine: onnx-ir maps the intermediate files and copies each initializer
    that is still used into one fresh, 64 KiB-aligned data file, one tensor at a time.

    ONNX Runtime's offline optimization (``optimized_model_filepath``) is NOT used: measured on a 400 MB float32
    model it peaks at 1.55x the model bytes (a session holds 1.28x; serializing the optimized model adds 0.27x),
    which made it the build's peak. The same optimizations run when the engine loads (session.json
    ``load_optimization_level: extended``), at the memory any session of the model needs anyway.
    """
    import onnx
    import onnx_ir as ir

    from llmopt import ort as F

    (src.parent / SOURCE_DATA).unlink(missing_ok=True)  # onnx-ir refuses hard-linked data files
    proto = onnx.load(str(src), load_external_data=False)
    F.relocate(proto, SOURCE_DATA, DATA_FILE)
    model = ir.serde.deserialize_model(proto)
    for value in model.graph.initializers.values():  # the export's tensors are read where the export wrote them
        t = value.const_value
        if isinstance(t, ir.ExternalTensor):
            t.base_dir = str(onnx_dir if t.location == DATA_FILE else src.parent)
    with progress.task("write the engine (one tensor at a time)", total=len(model.graph.initializers)) as advance:
        ir.save(model, str(dst), external_data=DATA_FILE, size_threshold_bytes=1024, alignment=1 << 16,
                callback=lambda tensor, info: advance())


def _checkpoint_config(onnx_art: Artifact) -> dict:
    """config.json of the checkpoint the export came from ({} when the lineage has none)."""
    ckpt = next((a for a in lineage(onnx_art) if a.kind == "checkpoint"), None)
    if ckpt is None or not (ckpt.path / "config.json").exists():
        return {}
    return json.loads((ckpt.path / "config.json").read_text())


def _sliding_window(onnx_art: Artifact) -> int | None:
    """The checkpoint's attention window when it limits attention (from the lineage's config.json)."""
    cfg = _checkpoint_config(onnx_art)
    if not cfg or cfg.get("use_sliding_window") is False:
        return None
    return cfg.get("sliding_window")


def _link_source_data(onnx_art: Artifact, out: Path) -> None:
    """Make the export's external data readable beside the rewritten graph (a hard link; a copy across
    file systems), so untouched initializers are never loaded, only referenced."""
    src, dst = onnx_art.path / DATA_FILE, out / SOURCE_DATA
    if not src.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def rewrite_for_ort(onnx_art: Artifact, out: Path, config: BuildConfig, io: dict) -> tuple[Path, dict, dict]:
    """Apply the ORT-only graph rewrites; returns (model to optimize, its io.json, what was done).

    The graph is loaded without its weights; rewrites read the initializers they change one at a time and
    write the ones they make straight to ``rewritten.onnx.data`` (:class:`llmopt.ort.TensorStore`)."""
    import onnx

    from llmopt import ort as F

    src = onnx_art.path / MODEL_FILE
    model = onnx.load(str(src), load_external_data=False)
    store = F.TensorStore(base_dir=onnx_art.path, out_file=out / (REWRITTEN + ".data"))
    done: dict = {"attention": "standard"}
    capacity = config.envelope.total_len[2]
    if config.attention != "standard":
        window = _sliding_window(onnx_art)
        try:
            if window is not None and window < capacity:
                raise F.RewriteUnsupported(f"sliding-window attention ({window} < KV capacity {capacity})")
            done = F.fuse_gqa(model, io, capacity, store=store)
            io = F.gqa_io(io, capacity)
        except F.RewriteUnsupported as exc:
            if config.attention == "gqa":
                raise UserError(f"{onnx_art.path}: cannot use GroupQueryAttention: {exc}",
                                "build with attention: standard (or auto)") from None
            model = onnx.load(str(src), load_external_data=False)  # the failed rewrite may have edited it
            done = {"attention": "standard", "gqa_unsupported": str(exc)}
    done["skip_rmsnorm"] = F.fuse_skip_rmsnorm(model)
    done.update(F.pack_matmuls(model, store))
    if config.quantize_lm_head != "none":
        try:
            model, done["lm_head"] = F.quantize_lm_head(model, bits=4 if config.quantize_lm_head == "int4" else 8,
                                                        accuracy_level=config.accuracy_level, store=store)
        except F.RewriteUnsupported as exc:
            raise UserError(f"{onnx_art.path}: cannot quantize lm_head: {exc}", "build with quantize_lm_head: none") from None
    else:
        done["lm_head"] = F.fuse_tied_lm_head(model)
    if done["attention"] == "gqa":  # the session that feeds it; a standard graph keeps the export's outputs
        done["logits_window"] = F.add_logits_window(model)
        io = {**io, "logits_window": F.LOGITS_FROM}
    _link_source_data(onnx_art, out)
    F.relocate(model, DATA_FILE, SOURCE_DATA)
    dst = out / REWRITTEN
    onnx.save_model(model, str(dst))  # the graph only: every large tensor is already in a data file
    return dst, io, done


def kv_calibration_ids(config: BuildConfig, onnx_art: Artifact) -> tuple[np.ndarray, dict]:
    """[samples, seq_len] token ids of the KV calibration text, tokenized by the lineage's checkpoint."""
    from llmopt.models import presets
    from llmopt.models.loader import load_tokenizer
    from llmopt.quant.capture import calibration_ids

    cal = config.kv_calibration
    path = Path(cal.text) if cal.text is not None else presets.DEFAULT_CALIB_TEXT
    if not path.is_file():
        raise UserError(f"{path}: KV calibration text not found", "pass --kv-calibration FILE (plain text)")
    ckpt = next((a for a in lineage(onnx_art) if a.kind == "checkpoint"), None)
    tokenizer = load_tokenizer(ckpt.path) if ckpt is not None and ckpt.path.is_dir() else None
    if tokenizer is None:
        raise UserError(f"{onnx_art.path}: kv_cache int8 needs the checkpoint's tokenizer to calibrate, and the "
                        "lineage has none", "build from a checkpoint that ships tokenizer.json, or use kv_cache: float")
    seq_len = min(cal.seq_len, config.envelope.total_len[2])
    ids = calibration_ids(path.read_text(encoding="utf-8", errors="replace"), tokenizer, cal.samples, seq_len)
    return ids.numpy().astype(np.int64), {"text": str(path), "samples": cal.samples, "seq_len": seq_len}


def int8_kv_cache(src: Path, io: dict, config: BuildConfig, onnx_art: Artifact, entries: dict[str, str],
                  progress: Progress) -> tuple[dict, dict]:
    """Calibrate the cache range on the float GroupQueryAttention graph at ``src``, then make its cache
    int8 (rewrites ``src`` in place); returns (io.json, what was done)."""
    import onnx

    from llmopt import ort as F
    from llmopt.runtime.ort_session import OrtGqaSession

    if io.get("attention") != "gqa":
        raise UserError(f"{onnx_art.path}: kv_cache int8 needs the GroupQueryAttention graph, and this model kept "
                        "standard attention", "build with kv_cache: float")
    ids, summary = kv_calibration_ids(config, onnx_art)
    model = onnx.load(str(src), load_external_data=False)
    rotary = F.kv_rotary_of(model, io)
    session = OrtGqaSession(src, io, threads=config.threads or default_threads(), config_entries=entries)
    batch = 4
    with progress.task("calibrate the int8 KV cache", total=-(-len(ids) // batch)) as advance:
        rng = F.calibrate_kv(session, ids, rotary, batch=batch, on_batch=advance)
    del session
    done = {**summary, **F.quantize_kv_cache(model, io, rng.scales())}
    onnx.save_model(model, str(src))  # initializers stay in the external data file the proto points at
    return F.int8_io(io), done


def write_genai_config(out: Path, io: dict, settings: dict, config: BuildConfig, onnx_art: Artifact) -> str:
    """genai_config.json beside the model, so ONNX Runtime GenAI runs the engine directory as it is;
    returns what was done (for the manifest)."""
    from llmopt.ort import genai_config as G
    from llmopt.runtime import assets

    model_type = _checkpoint_config(onnx_art).get("model_type")
    if model_type not in G.GENAI_TYPES:
        return f"not written: model type {model_type!r} unknown to ONNX Runtime GenAI"
    a = assets.from_dir(out)
    context = io["kv_capacity"] if io.get("attention") == "gqa" else config.envelope.total_len[2]
    cfg = G.genai_config(io, settings, a.generation, model_type, context, a.eos_ids, a.pad_id, MODEL_FILE)
    (out / G.FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return "written"


def run(config: BuildConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    onnx_art = inputs[0]
    io = json.loads((onnx_art.path / "io.json").read_text())
    rewrite: dict = {}
    if config.device == "cpu":
        with progress.task("rewrite graph for ONNX Runtime (GroupQueryAttention, fused norms)"):
            src, io, rewrite = rewrite_for_ort(onnx_art, out, config, io)
        settings = session_settings(config, io)
        if config.kv_cache == "int8":
            io, rewrite["kv_cache"] = int8_kv_cache(src, io, config, onnx_art, settings["config_entries"], progress)
        save_engine(src, onnx_art.path, out / MODEL_FILE, progress)
        for f in [*out.glob(REWRITTEN + "*"), out / SOURCE_DATA]:
            f.unlink(missing_ok=True)
    else:  # CUDA kernels fuse at load; the portable graph is kept as is
        settings = session_settings(config, io)
        shutil.copy2(onnx_art.path / MODEL_FILE, out / MODEL_FILE)
        shutil.copy2(onnx_art.path / DATA_FILE, out / DATA_FILE)
    (out / "io.json").write_text(json.dumps(io, indent=2))
    (out / "session.json").write_text(json.dumps(settings, indent=2))
    genai = write_genai_config(out, io, settings, config, onnx_art)
    with progress.task("check the session loads"):
        t0 = time.perf_counter()
        make_session(out / MODEL_FILE, config.device, settings["intra_op_num_threads"] or default_threads(),
                     settings["config_entries"],
                     settings["load_optimization_level"])
        load_s = time.perf_counter() - t0
    import onnx

    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    ops: dict[str, int] = {}
    for node in graph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"backend": "onnxruntime", "device": config.device, "session": settings, "load_s": round(load_s, 3),
            "rewrite": rewrite, "attention": rewrite.get("attention", "standard"), "genai_config": genai,
            "nodes": len(graph.graph.node), "op_types": dict(sorted(ops.items()))}

"""bench: time an artifact against the PyTorch model it came from, in one run, on this machine.

Every system (the artifact, PyTorch eager, torch.compile, and any peer a script adds) runs in its own
worker process, so each one's peak RSS is its own high-water mark and no system inherits another's
allocator or thread pool. Workers load one after another, then the timed work goes round-robin (one
generation per system per round, the order rotated every round): on a shared, noisy machine each
system sees the same background load, so the ratios hold even where the absolute numbers drift.

Each worker speaks JSON lines on stdin/stdout (protocol below), so a worker for another runtime (ORT
GenAI in scripts/bench_peers.py) plugs in with a few lines of its own:

    → {"cmd": "load", ...}            ← {"ok": true, "load_s", "rss_before_mb", "weight_bytes", "artifact_bytes", ...}
    → {"cmd": "generate", "ids": [...], "new_tokens": n}   ← {"ok": true, "prefill_s", "step_s": [...], "tokens": [...]}
    → {"cmd": "rss"}                  ← {"ok": true, "peak_rss_mb", "rss_mb"}
    → {"cmd": "profile", ...}         ← {"ok": true, "ops": {op: ms/step}}   (ONNX Runtime artifacts only)
    any failure                       ← {"ok": false, "error": "one line"}

The decode floor is the bytes of weights one decode step reads (every weight once; one row of an
embedding table) divided by the read bandwidth measured in this run (a multi-threaded sum over a
buffer much larger than the caches, best of several passes).
"""

from llmopt.bench.config import (BASELINES, CONTEXT_STEPS, LOAD_TIMEOUT_S, STEP_TIMEOUT_S, WARMUP_STEPS, BenchConfig,
                                 System)
from llmopt.bench.measure import onnx_weight_bytes, peak_rss_mb, read_bandwidth_gbs, torch_weight_bytes
from llmopt.bench.report import render
from llmopt.bench.runner import (WorkerProcess, bench, float_checkpoint, prompt_ids, run_bench, summarize,
                                 systems_for)
from llmopt.bench.worker import profile_ort_session, worker_main

__all__ = ["BASELINES", "CONTEXT_STEPS", "LOAD_TIMEOUT_S", "STEP_TIMEOUT_S", "WARMUP_STEPS", "BenchConfig", "System",
           "WorkerProcess", "bench", "float_checkpoint", "onnx_weight_bytes", "peak_rss_mb", "profile_ort_session",
           "prompt_ids", "read_bandwidth_gbs", "render", "run_bench", "summarize", "systems_for",
           "torch_weight_bytes", "worker_main"]

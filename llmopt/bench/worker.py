"""bench worker side: one process per system, serving the JSON-line protocol (``python -m llmopt.bench``)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmopt.artifact import open_artifact
from llmopt.bench.config import WARMUP_STEPS
from llmopt.bench.measure import onnx_weight_bytes, peak_rss_mb, torch_weight_bytes


class _Worker:
    def __init__(self) -> None:
        self.session = None
        self.kind = ""

    def load(self, msg: dict) -> dict:
        threads = msg.get("threads")
        rss_before = peak_rss_mb()[1]
        t0 = time.perf_counter()
        self.kind = msg["kind"]
        if self.kind == "artifact":
            from llmopt.runtime.open import artifact_bytes, backend_of, open_session

            art = open_artifact(Path(msg["path"]))
            if backend_of(art) == "torch":
                import torch

                torch.set_num_threads(threads)
            self.session = open_session(art, threads=threads)
            weights = (onnx_weight_bytes(art.path / "model.onnx") if (art.path / "model.onnx").exists() else
                       torch_weight_bytes(self.session.model) if hasattr(self.session, "model") else None)
            info = {"backend": self.session.backend, "artifact_bytes": artifact_bytes(art), "weight_bytes": weights}
        else:
            import torch

            from llmopt.models.loader import load_model
            from llmopt.runtime.open import artifact_bytes
            from llmopt.runtime.torch_session import TorchSession

            torch.set_num_threads(threads)
            model, _ = load_model(Path(msg["path"]))
            self.session = TorchSession(model, compile=self.kind == "torch-compile")
            info = {"backend": "torch", "artifact_bytes": artifact_bytes(open_artifact(Path(msg["path"]))),
                    "weight_bytes": torch_weight_bytes(model), "torch": torch.__version__}
        load_s = time.perf_counter() - t0
        # warm-up with the timed shapes (compiles for torch.compile)
        t0 = time.perf_counter()
        self.generate({"ids": msg["warmup_ids"], "new_tokens": msg.get("warmup_tokens", 8)})
        return {"ok": True, "load_s": load_s, "warmup_s": time.perf_counter() - t0, "rss_before_mb": rss_before,
                "threads": threads, **info}

    def generate(self, msg: dict) -> dict:
        from llmopt.runtime.generate import greedy

        g = greedy(self.session, [list(msg["ids"])], int(msg["new_tokens"]))
        return {"ok": True, "prefill_s": g.prefill_s, "step_s": g.step_s, "tokens": g.tokens[0].tolist()}

    def profile(self, msg: dict) -> dict:
        """Per-op-type kernel time per decode step from ONNX Runtime's profiler."""
        sess = self.session
        if getattr(sess, "backend", "") != "onnxruntime":
            return {"ok": False, "error": "profiling is for ONNX Runtime artifacts"}
        return {"ok": True, **profile_ort_session(sess, msg["ids"], int(msg["new_tokens"]))}

    def rss(self, msg: dict) -> dict:
        peak, cur = peak_rss_mb()
        return {"ok": True, "peak_rss_mb": peak, "rss_mb": cur}


def profile_ort_session(sess: Any, ids: list[int], new_tokens: int) -> dict:
    """Re-open ``sess``'s model with profiling on, run one generation, sum kernel time per op type."""
    from llmopt.runtime.generate import greedy

    sess.reopen(profile_prefix=f"/tmp/llmopt-profile-{os.getpid()}")
    try:
        greedy(sess, [list(ids)], new_tokens)
        path = sess.session.end_profiling()
    finally:
        sess.reopen()
    events = json.loads(Path(path).read_text())
    Path(path).unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode = runs[1 + WARMUP_STEPS:]
    start = decode[0]["ts"] if decode else float("inf")
    per: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"]["op_name"]
            per[op] = per.get(op, 0.0) + e["dur"]
    n = max(len(decode), 1)
    ops = {k: round(v / n / 1e3, 4) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}
    return {"decode_steps": len(decode), "run_ms": round(sum(r["dur"] for r in decode) / n / 1e3, 3),
            "kernels_ms": round(sum(per.values()) / n / 1e3, 3), "ops_ms": ops,
            "prefill_ms": round(runs[0]["dur"] / 1e3, 3) if runs else None}


def worker_main() -> None:
    """``python -m llmopt.bench``: serve JSON-line commands; stdout carries only replies."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # library chatter goes to stderr
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    w = _Worker()
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "quit":
            break
        try:
            reply = getattr(w, cmd)(msg)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which shows it as a failure
            reply = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()

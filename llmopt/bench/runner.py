"""bench parent side: start the workers, time the systems round-robin, summarize into the report."""

from __future__ import annotations

import json
import os
import select
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.artifact import Artifact, lineage, open_artifact
from llmopt.bench.config import (BASELINES, CONTEXT_STEPS, LOAD_TIMEOUT_S, STEP_TIMEOUT_S, WARMUP_STEPS, BenchConfig,
                                 System)
from llmopt.bench.measure import read_bandwidth_gbs
from llmopt.errors import UserError


class WorkerProcess:
    def __init__(self, system: System) -> None:
        env = {**os.environ, **(system.env or {})}
        self.system = system
        self.proc = subprocess.Popen(system.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL if not os.environ.get("LLMOPT_BENCH_DEBUG") else None,
                                     text=True, env=env)

    def ask(self, msg: dict, timeout: float) -> dict:
        if self.proc.poll() is not None:
            return {"ok": False, "error": f"worker exited with code {self.proc.returncode}"}
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            return {"ok": False, "error": f"no answer within {timeout:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            return {"ok": False, "error": f"worker exited with code {self.proc.wait()}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()


def float_checkpoint(artifact: Artifact) -> Artifact:
    """The unquantized checkpoint an artifact descends from (the baseline PyTorch model)."""
    ckpts = [a for a in lineage(artifact) if a.kind == "checkpoint"]
    if not ckpts:
        raise UserError(f"{artifact.path}: cannot find the checkpoint it came from (lineage broken)",
                        "bench an artifact built by llmopt from a checkpoint that still exists")
    plain = [a for a in ckpts if a.stage != "quantize"]
    return plain[0] if plain else ckpts[-1]


def prompt_ids(vocab: int, length: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, length).tolist()


def systems_for(artifact: Artifact, baselines: list[str]) -> list[System]:
    systems = [System(name=f"llmopt {artifact.metadata.get('backend', artifact.kind)} {artifact.path.name}",
                      kind="artifact", load={"kind": "artifact", "path": str(artifact.path)})]
    if baselines:
        ckpt = float_checkpoint(artifact)
        names = {"torch": "torch eager", "torch-compile": "torch.compile"}
        for b in baselines:
            systems.append(System(name=names[b], kind=b, load={"kind": b, "path": str(ckpt.path)}))
    return systems


def _stats(steps: list[float]) -> dict:
    s = np.asarray(steps) * 1e3
    return {"median": float(np.median(s)), "p90": float(np.percentile(s, 90))} if s.size else {"median": None, "p90": None}


def run_bench(systems: list[System], config: BenchConfig, vocab: int, log=lambda m: None) -> dict:  # noqa: ANN001
    """Load every system, time them round-robin, return the report (see module docstring)."""
    from llmopt.runtime.ort_session import default_threads

    threads = config.threads or default_threads()
    prompt = prompt_ids(vocab, config.prompt_len, config.seed)
    log(f"memory bandwidth ({threads} threads)…")
    bw_start = read_bandwidth_gbs(threads)
    results: dict[str, dict] = {}
    workers: dict[str, WorkerProcess] = {}
    for s in systems:
        log(f"load + warm up: {s.name}")
        w = WorkerProcess(s)
        reply = w.ask({"cmd": "load", **s.load, "threads": threads, "warmup_ids": prompt}, LOAD_TIMEOUT_S)
        if reply.get("ok"):
            reply = {**s.extra, **reply}
        results[s.name] = {"name": s.name, "kind": s.kind, "ok": reply.get("ok", False), "load": reply,
                           "runs": [], "contexts": {}}
        if reply.get("ok"):
            workers[s.name] = w
        else:
            results[s.name]["error"] = reply.get("error")
            log(f"  failed: {reply.get('error')}")
            w.close()
    names = list(workers)
    for name in names:  # an untimed round: caches, allocators and thread pools settle in every system
        workers[name].ask({"cmd": "generate", "ids": prompt, "new_tokens": config.new_tokens}, STEP_TIMEOUT_S)
    for r in range(config.repeat):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        log(f"round {r + 1}/{config.repeat}: prompt {config.prompt_len}, {config.new_tokens} new tokens")
        for name in order:
            reply = workers[name].ask({"cmd": "generate", "ids": prompt, "new_tokens": config.new_tokens}, STEP_TIMEOUT_S)
            _record(results[name], reply, "runs")
    # each system runs all its context lengths back to back within a round, so its ratio (longest ÷
    # shortest) compares measurements seconds apart, not phases minutes apart under a different load
    ctx_ids = {ctx: prompt_ids(vocab, ctx, config.seed + ctx) for ctx in config.contexts}
    for r in range(config.repeat if ctx_ids else 0):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        log(f"contexts {', '.join(map(str, ctx_ids))}: round {r + 1}/{config.repeat}")
        for name in order:
            for ctx, ids in (ctx_ids.items() if r % 2 == 0 else reversed(ctx_ids.items())):
                if not results[name]["ok"]:
                    break
                reply = workers[name].ask({"cmd": "generate", "ids": ids, "new_tokens": CONTEXT_STEPS + WARMUP_STEPS + 1},
                                          STEP_TIMEOUT_S)
                results[name]["contexts"].setdefault(str(ctx), [])
                _record(results[name], reply, None, results[name]["contexts"][str(ctx)])
    for name, w in workers.items():  # before profiling, which opens a second session
        results[name]["rss"] = w.ask({"cmd": "rss"}, 60)
    if config.profile:
        longest = max(config.contexts, default=config.prompt_len)
        for name in names:
            if results[name]["ok"] and results[name]["load"].get("backend") == "onnxruntime":
                log(f"profile: {name} (prompt {config.prompt_len}, then context {longest})")
                results[name]["profile"] = workers[name].ask({"cmd": "profile", "ids": prompt, "new_tokens": 32},
                                                             STEP_TIMEOUT_S)
                if longest != config.prompt_len:
                    results[name]["profile_context"] = workers[name].ask(
                        {"cmd": "profile", "ids": prompt_ids(vocab, longest, config.seed + longest), "new_tokens": 32},
                        STEP_TIMEOUT_S)
    for w in workers.values():
        w.close()
    bw_end = read_bandwidth_gbs(threads)
    bandwidth = max(bw_start["read_gbs"], bw_end["read_gbs"])
    report = {"config": {**asdict(config), "threads": threads, "batch": 1},
              "machine": {"cpu_count": os.cpu_count(), "bandwidth_start": bw_start, "bandwidth_end": bw_end,
                          "read_gbs": bandwidth},
              "systems": [summarize(results[s.name], bandwidth, config) for s in systems]}
    eager = next((x for x in report["systems"] if x["kind"] == "torch" and x["ok"]), None)
    for x in report["systems"]:
        if eager and x["ok"] and x.get("decode_ms_median"):
            x["decode_speedup_vs_eager"] = eager["decode_ms_median"] / x["decode_ms_median"]
            x["prefill_speedup_vs_eager"] = eager["prefill_ms"] / x["prefill_ms"]
        agree = None
        if eager and x["ok"] and eager.get("tokens") and x.get("tokens"):
            a, b = np.asarray(x["tokens"]), np.asarray(eager["tokens"])
            agree = float((a == b).mean())
        x["token_match_vs_eager"] = agree
    return report


def _record(result: dict, reply: dict, key: str | None, into: list | None = None) -> None:
    if not reply.get("ok"):
        result["ok"] = False
        result["error"] = reply.get("error")
        return
    (into if into is not None else result[key]).append(reply)


def summarize(res: dict, bandwidth_gbs: float, config: BenchConfig) -> dict:
    out: dict[str, Any] = {"name": res["name"], "kind": res["kind"], "ok": res["ok"] and bool(res["runs"])}
    load = res["load"]
    if not out["ok"]:
        out["error"] = res.get("error") or load.get("error")
        return out
    runs = res["runs"]
    per_run = [_stats(r["step_s"][WARMUP_STEPS:]) for r in runs]
    steps = [s for r in runs for s in r["step_s"][WARMUP_STEPS:]]
    decode = _stats(steps)
    prefill = float(np.median([r["prefill_s"] for r in runs]) * 1e3)
    wbytes = load.get("weight_bytes")
    floor = wbytes / (bandwidth_gbs * 1e9) * 1e3 if wbytes else None
    ctx, ctx_rounds = {}, {}
    for c, replies in res["contexts"].items():
        st = [s for r in replies for s in r["step_s"][WARMUP_STEPS:]]
        ctx[c] = _stats(st)["median"]
        ctx_rounds[c] = [_stats(r["step_s"][WARMUP_STEPS:])["median"] for r in replies]
    lo, hi = (min(ctx, key=int), max(ctx, key=int)) if ctx else (None, None)
    rss = res.get("rss", {})
    out.update({
        "backend": load.get("backend"), "load_s": load.get("load_s"), "warmup_s": load.get("warmup_s"),
        "prefill_ms": prefill, "prefill_tokens_per_s": config.prompt_len / prefill * 1e3,
        "decode_ms_median": decode["median"], "decode_ms_p90": decode["p90"],
        "decode_ms_median_per_round": [p["median"] for p in per_run],
        "tokens_per_s": 1e3 / decode["median"],
        "peak_rss_mb": rss.get("peak_rss_mb"), "model_rss_mb": (rss["peak_rss_mb"] - load["rss_before_mb"])
        if rss.get("peak_rss_mb") else None, "end_rss_mb": rss.get("rss_mb"),
        "artifact_bytes": load.get("artifact_bytes"), "weight_bytes_per_token": wbytes,
        "decode_floor_ms": floor, "floor_fraction": floor / decode["median"] if floor else None,
        "context_decode_ms": ctx,
        "context_ratio": (ctx[hi] / ctx[lo]) if len(ctx) > 1 else None,
        "context_ratio_per_round": [b / a for a, b in zip(ctx_rounds[lo], ctx_rounds[hi])] if len(ctx) > 1 else [],
        "tokens": runs[-1]["tokens"],
    })
    for key in ("profile", "profile_context"):
        if key in res:
            out[key] = res[key]
    return out


def bench(engine: Path, baselines: list[str], config: BenchConfig, log=lambda m: None,  # noqa: ANN001
          baselines_required: bool = True) -> dict:
    """``baselines_required=False`` (the default baselines, not asked for by name): an artifact whose
    checkpoint is not reachable (a self-contained engine moved elsewhere) is timed alone."""
    art = open_artifact(engine, ("engine", "onnx", "checkpoint"))
    if baselines and not baselines_required and not any(a.kind == "checkpoint" for a in lineage(art)):
        log("baselines skipped: the checkpoint this artifact came from is not reachable from here")
        baselines = []
    for b in baselines:
        if b not in BASELINES:
            raise UserError(f"--baseline {b!r}: expected one of {', '.join(BASELINES)}")
    if art.kind == "checkpoint":
        vocab = json.loads((art.path / "config.json").read_text()).get("vocab_size")
    else:
        vocab = json.loads((art.path / "io.json").read_text())["vocab_size"]
    return run_bench(systems_for(art, baselines), config, vocab, log)

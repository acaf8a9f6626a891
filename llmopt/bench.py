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

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.artifact import Artifact, lineage, open_artifact
from llmopt.errors import UserError

BASELINES = ("torch", "torch-compile")
WARMUP_STEPS = 2           # decode steps of each generation left out of the statistics
CONTEXT_STEPS = 16         # decode steps timed at each context length
LOAD_TIMEOUT_S = 900       # torch.compile compiles during its warm-up
STEP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class BenchConfig:
    prompt_len: int = 128
    new_tokens: int = 64
    threads: int | None = None
    repeat: int = 3
    contexts: tuple[int, ...] = (128, 512, 1024)
    seed: int = 0
    profile: bool = False


@dataclass
class System:
    """One thing to time: how to start its worker and what to tell it to load."""

    name: str
    kind: str                          # artifact | torch | torch-compile | a peer's own kind
    load: dict                         # the worker's load command (without "cmd")
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "llmopt.bench"])
    env: dict | None = None
    extra: dict = field(default_factory=dict)  # load facts a foreign worker cannot tell (weight_bytes, artifact_bytes)


# ---------------------------------------------------------------- measurements shared with workers

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


# ---------------------------------------------------------------- worker side

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


# ---------------------------------------------------------------- parent side

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
    for ctx in config.contexts:
        ids = prompt_ids(vocab, ctx, config.seed + ctx)
        for r in range(config.repeat):
            order = names[r % len(names):] + names[:r % len(names)] if names else []
            log(f"context {ctx}: round {r + 1}/{config.repeat}")
            for name in order:
                if not results[name]["ok"]:
                    continue
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
    ctx = {}
    for c, replies in res["contexts"].items():
        st = [s for r in replies for s in r["step_s"][WARMUP_STEPS:]]
        ctx[c] = _stats(st)["median"]
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
        "context_ratio": (ctx[max(ctx, key=int)] / ctx[min(ctx, key=int)]) if len(ctx) > 1 else None,
        "tokens": runs[-1]["tokens"],
    })
    for key in ("profile", "profile_context"):
        if key in res:
            out[key] = res[key]
    return out


def render(report: dict, console: Any) -> None:
    from rich.table import Table

    cfg, m = report["config"], report["machine"]
    console.print(f"batch 1 · prompt {cfg['prompt_len']} · {cfg['new_tokens']} new tokens · {cfg['threads']} threads · "
                  f"{cfg['repeat']} rounds · read bandwidth {m['read_gbs']:.1f} GB/s "
                  f"(start {m['bandwidth_start']['read_gbs']:.1f}, end {m['bandwidth_end']['read_gbs']:.1f})",
                  highlight=False)
    ctxs = [str(c) for c in cfg["contexts"]]
    t = Table("system", "prefill\nms", "decode ms\np50 / p90", "tok/s", "×eager", "floor ms\n(% met)",
              "RSS MB\npeak (model)", "size\nMB", *[f"ms @{c}" for c in ctxs], box=None, pad_edge=False)

    def f(v, fmt="{:.1f}"):  # noqa: ANN001, ANN202
        return "—" if v is None else fmt.format(v)

    for s in report["systems"]:
        if not s["ok"]:
            t.add_row(s["name"], f"[red]failed: {s.get('error')}[/]")
            continue
        t.add_row(s["name"], f(s["prefill_ms"], "{:.0f}"),
                  f"{f(s['decode_ms_median'], '{:.2f}')} / {f(s['decode_ms_p90'], '{:.2f}')}", f(s["tokens_per_s"]),
                  f(s.get("decode_speedup_vs_eager"), "{:.2f}"),
                  f"{f(s['decode_floor_ms'], '{:.1f}')} ({f(s['floor_fraction'] and 100 * s['floor_fraction'], '{:.0f}%')})",
                  f"{f(s['peak_rss_mb'], '{:.0f}')} ({f(s['model_rss_mb'], '{:.0f}')})",
                  f(s["artifact_bytes"] and s["artifact_bytes"] / 1e6, "{:.0f}"),
                  *[f(s["context_decode_ms"].get(c), "{:.2f}") for c in ctxs])
    width = console.width
    console.width = max(width, 150)  # a table, not prose: let logs keep it on one line per system
    try:
        console.print(t)
    finally:
        console.width = width
    for s in report["systems"]:
        for key, where in (("profile", f"prompt {cfg['prompt_len']}"), ("profile_context", "longest context")):
            p = s.get(key, {})
            if p.get("ok"):
                top = ", ".join(f"{k} {v:.2f}" for k, v in list(p["ops_ms"].items())[:6])
                console.print(f"profile {s['name']} ({where}): {p['run_ms']:.2f} ms/decode step; {top}", highlight=False)


def bench(engine: Path, baselines: list[str], config: BenchConfig, log=lambda m: None) -> dict:  # noqa: ANN001
    art = open_artifact(engine, ("engine", "onnx", "checkpoint"))
    for b in baselines:
        if b not in BASELINES:
            raise UserError(f"--baseline {b!r}: expected one of {', '.join(BASELINES)}")
    if art.kind == "checkpoint":
        vocab = json.loads((art.path / "config.json").read_text()).get("vocab_size")
    else:
        vocab = json.loads((art.path / "io.json").read_text())["vocab_size"]
    return run_bench(systems_for(art, baselines), config, vocab, log)


if __name__ == "__main__":
    worker_main()

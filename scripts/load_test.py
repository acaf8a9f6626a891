"""Bounded load test of `llmopt serve`: closed-loop clients at fixed concurrency levels.

Each level runs C clients; each client sends R streamed /v1/completions requests one after the other
(prompt of exactly --prompt-tokens token ids, exactly --output-tokens generated: greedy, ignore_eos).
Client i starts i/C of a single request's duration after client 0 (--start staggered, the default), so
requests arrive spread out as they would from independent users; --start burst sends all C at once
(every level then begins with C prompts waiting together). Per level it records:

* aggregate output throughput: completion tokens of all requests / wall time of the level;
* time to first token (request sent → first SSE chunk) p50 / p99;
* inter-token latency (gaps between a request's SSE chunks; the server sends one chunk per token) p50 / p99;
* failed requests (any non-200, any stream that ends without finish_reason or with fewer tokens).

It stops by itself: a fixed number of requests per level and a per-request timeout.

  python scripts/load_test.py --engine ENGINE [--max-batch 16]      # starts `llmopt serve` itself
  python scripts/load_test.py --url http://127.0.0.1:8000 --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Result:
    ok: bool
    ttft: float = float("nan")
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], new: int,
                      timeout: float) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    times: list[float] = []
    finish = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                times.append(time.perf_counter())
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(False, error=str(chunk["error"]))
                finish = chunk["choices"][0]["finish_reason"] or finish
    except (httpx.HTTPError, OSError) as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}")
    if finish != "length" or len(times) != new:
        return Result(False, tokens=len(times), error=f"finish_reason {finish}, {len(times)} chunks")
    return Result(True, times[0] - t0, list(np.diff(times)), len(times))


def server_counters(url: str) -> dict[str, float]:
    """Decode-step counters from /metrics: how many steps, their total time, how many rows they ran."""
    want = ("llmopt_decode_step_seconds_sum", "llmopt_decode_step_seconds_count", "llmopt_decode_batch_size_sum")
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            out[name] = float(value)
    return out


async def run_level(url: str, model: str, concurrency: int, requests: int, prompt_tokens: int, new: int,
                    vocab: int, stagger_s: float, timeout: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [[rng.integers(3, vocab, prompt_tokens).tolist() for _ in range(requests)] for _ in range(concurrency)]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def worker(i: int) -> list[Result]:
            await asyncio.sleep(stagger_s * i / concurrency)
            return [await one_request(client, url, model, p, new, timeout) for p in prompts[i]]

        before = server_counters(url)
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
        after = server_counters(url)
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    steps, step_s = d["llmopt_decode_step_seconds_count"], d["llmopt_decode_step_seconds_sum"]
    results = [r for rs in per_client for r in rs]
    good = [r for r in results if r.ok]
    ttft = np.array([r.ttft for r in good]) * 1e3
    gaps = np.array([g for r in good for g in r.gaps]) * 1e3
    pct = lambda a, q: float(np.percentile(a, q)) if a.size else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(good),
            "errors": sorted({r.error for r in results if not r.ok})[:3], "wall_s": wall,
            "output_tok_s": sum(r.tokens for r in good) / wall,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(gaps, 50), "itl_ms_p99": pct(gaps, 99),
            "decode_steps": steps, "mean_decode_batch": d["llmopt_decode_batch_size_sum"] / steps if steps else 0.0,
            "mean_decode_step_ms": step_s / steps * 1e3 if steps else 0.0,
            "decode_tok_s_in_steps": d["llmopt_decode_batch_size_sum"] / step_s if step_s else 0.0}


def start_server(engine: str, max_batch: int | None, extra: list[str]) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, "-m", "llmopt", "serve", engine, "--port", "0", "--json", "--max-queue", "256", *extra]
    if max_batch:
        cmd += ["--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"llmopt serve exited with {proc.wait()}")
    return proc, json.loads(line)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        return platform.processor() or "?"


def table(levels: list[dict], base: dict) -> str:
    rows = ["| concurrency | requests | failed | output tok/s | × c=1 | TTFT p50 ms | TTFT p99 ms | p99 TTFT × c=1 | "
            "ITL p50 ms | ITL p99 ms | mean decode batch | decode step ms | decode tok/s in steps |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        rows.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['failed']} | {lv['output_tok_s']:.1f} | "
                    f"{lv['output_tok_s'] / base['output_tok_s']:.2f} | {lv['ttft_ms_p50']:.0f} | {lv['ttft_ms_p99']:.0f} | "
                    f"{lv['ttft_ms_p99'] / base['ttft_ms_p99']:.2f} | {lv['itl_ms_p50']:.1f} | {lv['itl_ms_p99']:.1f} | "
                    f"{lv['mean_decode_batch']:.1f} | {lv['mean_decode_step_ms']:.1f} | {lv['decode_tok_s_in_steps']:.0f} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine", help="engine directory: start `llmopt serve` on a free port for the test")
    src.add_argument("--url", help="an already running server")
    ap.add_argument("--model", help="model id (default: the server's)")
    ap.add_argument("--max-batch", type=int, help="--max-batch for the server started with --engine")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `llmopt serve` argument (repeatable)")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per level")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--start", choices=("staggered", "burst"), default="staggered")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per request")
    ap.add_argument("--json", dest="json_out", help="write the results here")
    args = ap.parse_args()

    proc = None
    if args.engine:
        proc, ready = start_server(args.engine, args.max_batch, args.serve_arg)
        url, model = ready["url"], args.model or ready["model"]
    else:
        url, model = args.url.rstrip("/"), args.model
        if model is None:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    try:
        health = httpx.get(url + "/health").json()
        vocab = 4096  # ids every preset's embedded tokenizer can print; the prompt is ids, so length is exact
        asyncio.run(run_level(url, model, 1, 1, args.prompt_tokens, 4, vocab, 0, args.timeout, 0))  # warm-up
        single = asyncio.run(run_level(url, model, 1, 1, args.prompt_tokens, args.output_tokens, vocab, 0,
                                       args.timeout, 1))
        request_s = single["wall_s"]
        levels = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            stagger = request_s if args.start == "staggered" else 0.0
            lv = run_level(url, model, c, args.requests, args.prompt_tokens, args.output_tokens, vocab, stagger,
                           args.timeout, seed=c)
            levels.append(asyncio.run(lv))
            print(json.dumps(levels[-1]), file=sys.stderr)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    base = levels[0]
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "server": health, "model": model, "start": args.start,
              "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
              "requests_per_client": args.requests, "single_request_s": request_s, "levels": levels,
              "server_exit_code": proc.returncode if proc else None}
    print(table(levels, base))
    print(f"\nCPU: {report['cpu']} ({report['cores']} cores); start: {args.start}; prompt {args.prompt_tokens} tokens, "
          f"output {args.output_tokens} tokens, {args.requests} requests per client")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(lv["failed"] == 0 for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())

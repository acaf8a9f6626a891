"""llmopt's ONNX Runtime artifacts next to the systems a user would otherwise pick, in one run.

Not a test. On the same ``preset:bench-246m`` weights (random Llama, 246M parameters) it times, with the
round-robin workers of ``llmopt.bench`` (one process per system, same prompt, same threads):

  llmopt int4 as the GenAI builder makes it (RTN block 32, lm_head int4 block 32, float KV cache)
  llmopt int4 at the quantize stage's group 128: lm_head int4 + int8 KV cache, lm_head int4 + float KV
  cache, and lm_head int8 + int8 KV cache (the recipes/int4-cpu-fast.yaml build)
  llmopt fp32
  ONNX Runtime GenAI model builder int4 (its defaults: block 32), int4 with block_size=128, and fp32
  CPU models, through GenAI's own Generator API
  GenAI's runtime on llmopt's headline engine directory as it is (its genai_config.json)
  PyTorch eager and torch.compile (inductor) on the float checkpoint

and prints one table of ratios plus the issue's targets. Speed does not depend on the weight values, so
the group-128 engines use RTN (GPTQ/AWQ write the same bytes); what each scheme costs in quality is
measured on the trained model by ``llmopt validate`` (docs/performance.md). The GenAI side lives in its
own virtual environment (default ~/.cache/llmopt/peers-venv), created here on first use with
``pip install torch==2.13.0 onnxruntime-genai transformers ...``: onnxruntime-genai pulls its own
onnxruntime, which must never land in the project's .venv.

    .venv/bin/python scripts/bench_peers.py [--workdir work/peers] [--threads 2] [--repeat 3]

The same file is the GenAI worker (``--genai-worker``, run by the peers venv's Python): it imports only
numpy and onnxruntime_genai and speaks llmopt.bench's JSON-line protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# (table label, llmopt_artifacts key); HEADLINE is the system the int4 targets are read from
OURS = [("llmopt int4 (GenAI scheme)", "int4"),
        ("llmopt int4 g128, lm_head int4, KV int8", "int4-g128-kv8"),
        ("llmopt int4 g128, lm_head int4", "int4-g128"),
        ("llmopt int4 g128, lm_head int8, KV int8", "int4-g128-lm8-kv8"),
        ("llmopt fp32", "fp32")]
HEADLINE = OURS[1][0]
PEERS_VENV = Path(os.environ.get("LLMOPT_PEERS_VENV", Path.home() / ".cache" / "llmopt" / "peers-venv"))
PEER_PACKAGES = ["onnxruntime-genai==0.18.0", "transformers==5.24.0", "onnx", "onnx-ir", "safetensors", "tqdm"]


# ------------------------------------------------------------------ GenAI worker (peers venv only)

def _rss() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def genai_worker() -> None:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import onnxruntime_genai as og

    model = None

    def generate(ids: list[int], new_tokens: int) -> dict:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)        # runs the prompt
        gen.generate_next_token()     # picks the first token from the prompt's logits (no model run)
        prefill = time.perf_counter() - t0
        steps = []
        for _ in range(new_tokens - 1):  # each call runs one decode step, then picks the next token
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
        tokens = list(gen.get_sequence(0))[len(ids):]
        return {"ok": True, "prefill_s": prefill, "step_s": steps, "tokens": [int(t) for t in tokens]}

    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "quit":
            break
        try:
            if cmd == "load":
                before = _rss()[1]
                t0 = time.perf_counter()
                cfg = og.Config(msg["path"])
                cfg.clear_providers()  # CPU
                cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": msg["threads"], "inter_op_num_threads": 1}}}}))
                model = og.Model(cfg)
                load_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                generate(msg["warmup_ids"], 8)
                reply = {"ok": True, "load_s": load_s, "warmup_s": time.perf_counter() - t0, "rss_before_mb": before,
                         "backend": f"onnxruntime-genai {og.__version__}", "threads": msg["threads"]}
            elif cmd == "generate":
                reply = generate(msg["ids"], int(msg["new_tokens"]))
            elif cmd == "rss":
                peak, cur = _rss()
                reply = {"ok": True, "peak_rss_mb": peak, "rss_mb": cur}
            else:
                reply = {"ok": False, "error": f"{cmd} is not supported by the GenAI worker"}
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            reply = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ------------------------------------------------------------------ driver (project .venv)

def peers_python() -> Path:
    """The peers venv's Python, created with GenAI (and its own onnxruntime) on first use."""
    py = PEERS_VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {PEERS_VENV} (onnxruntime-genai lives there, never in .venv)", file=sys.stderr)
        base = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(base), "-m", "venv", str(PEERS_VENV)], check=True)
        # torch first and pinned: an unpinned one pulls a multi-GB CUDA build
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    ok = subprocess.run([str(py), "-c", "import onnxruntime_genai"], capture_output=True).returncode == 0
    if not ok:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return py


def llmopt_artifacts(work: Path, source: str = "preset:bench-246m") -> dict[str, Path]:
    """float and int4 checkpoints, exports and ONNX Runtime engines (reused when up to date)."""
    from llmopt.artifact import open_artifact
    from llmopt.recipe import BuildConfig, ExportConfig, LoadConfig, QuantizeConfig
    from llmopt.runner import run_stage
    from llmopt.stages import build, export, load, quantize

    def log(m: str) -> None:
        print(m, file=sys.stderr)

    ckpt = run_stage(load.STAGE, LoadConfig(source=source), [], work / "ckpt", log=log).artifact
    onnx_fp = run_stage(export.STAGE, ExportConfig(), [ckpt], work / "onnx", log=log).artifact
    onnx_q = {}
    for group, suffix in ((32, ""), (128, "-g128")):
        q = run_stage(quantize.STAGE, QuantizeConfig(method="rtn", bits=4, group_size=group), [ckpt],
                      work / f"ckpt-int4{suffix}", log=log).artifact
        onnx_q[group] = run_stage(export.STAGE, ExportConfig(), [q], work / f"onnx-int4{suffix}", log=log).artifact
    out = {"ckpt": ckpt.path}
    for name, src, cfg in (("fp32", onnx_fp, BuildConfig()),
                           ("int4", onnx_q[32], BuildConfig(quantize_lm_head="int4")),
                           ("int4-g128", onnx_q[128], BuildConfig(quantize_lm_head="int4")),
                           ("int4-g128-kv8", onnx_q[128], BuildConfig(quantize_lm_head="int4", kv_cache="int8")),
                           ("int4-g128-lm8-kv8", onnx_q[128], BuildConfig(quantize_lm_head="int8", kv_cache="int8"))):
        out[name] = run_stage(build.STAGE, cfg, [src], work / f"engine-{name}", log=log).artifact.path
    open_artifact(out["int4"])
    return out


def hf_dir_for_genai(ckpt: Path, dst: Path) -> Path:
    """The checkpoint as a plain HF directory; a stand-in tokenizer when the checkpoint has none
    (the GenAI builder saves a tokenizer; token ids are fed directly, so its vocabulary is never used)."""
    key = json.loads((ckpt / "manifest.json").read_text())["key"]
    if (dst / "config.json").exists() and (dst / ".llmopt-source-key").is_file() \
            and (dst / ".llmopt-source-key").read_text() == key:
        return dst
    shutil.rmtree(dst, ignore_errors=True)  # a copy of an older checkpoint
    dst.mkdir(parents=True)
    (dst / ".llmopt-source-key").write_text(key)
    for f in ckpt.iterdir():
        if f.name != "manifest.json" and f.is_file():
            shutil.copy2(f, dst / f.name)
    if not (dst / "tokenizer.json").exists():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = json.loads((dst / "config.json").read_text())["vocab_size"]
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(dst)
    return dst


def genai_model(py: Path, hf: Path, out: Path, precision: str, extra: list[str] | None = None) -> Path:
    if (out / "genai_config.json").exists():
        return out
    print(f"ORT GenAI model builder: {precision} cpu {' '.join(extra or [])} → {out}", file=sys.stderr)
    subprocess.run([str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
                    "-e", "cpu", "-c", str(out.parent / "genai-cache"), *(["--extra_options", *extra] if extra else [])],
                   check=True, stdout=sys.stderr)
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("work/peers"))
    ap.add_argument("--source", default="preset:bench-246m",
                    help="what `llmopt load` reads (e.g. the SmolLM2 .gguf from scripts/fetch_smollm2.py)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--contexts", default="128,512,1024")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--no-torch", action="store_true", help="leave the PyTorch rows (eager, compile) out")
    ap.add_argument("--profile", action="store_true", help="per-op decode profile of the llmopt artifacts")
    ap.add_argument("--genai-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.genai_worker:
        genai_worker()
        return 0

    from rich.console import Console
    from rich.table import Table

    from llmopt.bench import BenchConfig, System, onnx_weight_bytes, render, run_bench

    console = Console(stderr=True)
    work = args.workdir.resolve()
    arts = llmopt_artifacts(work, args.source)
    py = peers_python()
    hf = hf_dir_for_genai(arts["ckpt"], work / "hf")
    genai = {"int4": genai_model(py, hf, work / "genai-int4", "int4"),
             "int4 (block 128)": genai_model(py, hf, work / "genai-int4-b128", "int4", ["block_size=128"]),
             "fp32": genai_model(py, hf, work / "genai-fp32", "fp32")}

    def ours(label: str, path: Path) -> System:
        return System(name=label, kind="artifact", load={"kind": "artifact", "path": str(path)})

    systems = [ours(label, arts[key]) for label, key in OURS]
    for p, path in genai.items():
        systems.append(System(name=f"ORT GenAI {p}", kind="genai", load={"kind": "genai", "path": str(path)},
                              command=[str(py), str(Path(__file__).resolve()), "--genai-worker"],
                              extra={"weight_bytes": onnx_weight_bytes(path / "model.onnx"),
                                     "artifact_bytes": dir_bytes(path)}))
    # GenAI's own runtime on llmopt's engine directory as it is (its genai_config.json): same graph, other loop
    systems.append(System(name=f"ORT GenAI runtime on {HEADLINE}", kind="genai",
                          load={"kind": "genai", "path": str(arts[dict(OURS)[HEADLINE]])},
                          command=[str(py), str(Path(__file__).resolve()), "--genai-worker"],
                          extra={"weight_bytes": onnx_weight_bytes(arts[dict(OURS)[HEADLINE]] / "model.onnx"),
                                 "artifact_bytes": dir_bytes(arts[dict(OURS)[HEADLINE]])}))
    if not args.no_torch:
        systems.append(System(name="torch eager", kind="torch", load={"kind": "torch", "path": str(arts["ckpt"])}))
    if not args.no_compile and not args.no_torch:
        systems.append(System(name="torch.compile", kind="torch-compile",
                              load={"kind": "torch-compile", "path": str(arts["ckpt"])}))
    cfg = BenchConfig(prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=args.threads, repeat=args.repeat,
                      contexts=tuple(int(c) for c in args.contexts.split(",") if c), profile=args.profile)
    vocab = json.loads((arts["ckpt"] / "config.json").read_text())["vocab_size"]
    report = run_bench(systems, cfg, vocab, log=lambda m: console.print(f"… {m}", highlight=False))
    render(report, console)
    (work / "peers.json").write_text(json.dumps(report, indent=2))

    by = {s["name"]: s for s in report["systems"]}

    def ratio(a: str, b: str, key: str = "decode_ms_median") -> float | None:
        x, y = by.get(a, {}), by.get(b, {})
        return y[key] / x[key] if x.get("ok") and y.get("ok") else None

    t = Table("system", "decode ms", "× eager", "× torch.compile", "× GenAI int4", "× GenAI int4 b128",
              "× GenAI fp32", "prefill ms", "ctx max/min", box=None, pad_edge=False)
    for s in report["systems"]:
        if not s["ok"]:
            t.add_row(s["name"], f"failed: {s.get('error')}")
            continue
        t.add_row(s["name"], f"{s['decode_ms_median']:.2f}",
                  *[("—" if r is None else f"{r:.2f}") for r in (ratio(s["name"], "torch eager"),
                                                                 ratio(s["name"], "torch.compile"),
                                                                 ratio(s["name"], "ORT GenAI int4"),
                                                                 ratio(s["name"], "ORT GenAI int4 (block 128)"),
                                                                 ratio(s["name"], "ORT GenAI fp32"))],
                  f"{s['prefill_ms']:.0f}", "—" if s.get("context_ratio") is None else f"{s['context_ratio']:.2f}")
    console.print(t, width=max(console.width, 150))
    targets = [
        (f"{HEADLINE} decode vs eager fp32 ≥ 6×", ratio(HEADLINE, "torch eager"), lambda v: v >= 6),
        (f"{HEADLINE} decode vs ORT GenAI int4 ≥ 1.0×", ratio(HEADLINE, "ORT GenAI int4"), lambda v: v >= 1.0),
        ("llmopt int4 as GenAI builds it, vs ORT GenAI int4 (same scheme)", ratio("llmopt int4 (GenAI scheme)",
                                                                               "ORT GenAI int4"), lambda v: v >= 1.0),
        ("fp32 decode vs eager ≥ 1.8×", ratio("llmopt fp32", "torch eager"), lambda v: v >= 1.8),
        (f"{HEADLINE} prefill of the prompt ≤ 600 ms", by.get(HEADLINE, {}).get("prefill_ms"), lambda v: v <= 600),
        (f"{HEADLINE} decode ms ctx max / ctx min ≤ 1.3×", by.get(HEADLINE, {}).get("context_ratio"), lambda v: v <= 1.3),
    ]
    for label, value, ok in targets:
        mark = "—" if value is None else ("✓" if ok(value) else "✗")
        console.print(f"{mark} {label}: {'n/a' if value is None else f'{value:.2f}'}", highlight=False)
    print(json.dumps({"report": str(work / "peers.json"), "targets": {label: value for label, value, _ in targets}},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

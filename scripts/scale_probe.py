"""Proof at scale: a random-weight checkpoint of a real model's shape through every llmopt stage, each
stage a child process whose wall time and peak RSS are recorded (``/usr/bin/time``'s maximum resident set
size of the child), beside ONNX Runtime GenAI's model builder on the same checkpoint where it fits.

    .venv/bin/python scripts/scale_probe.py --shape llama2-7b --workdir /tmp/probe-7b      # RTN int4 g128 chain
    .venv/bin/python scripts/scale_probe.py --shape tinyllama-1.1b --method gptq --stages load,quantize

The checkpoint is bfloat16 in 2 GB hub-style shards with ``model.safetensors.index.json``. It is made tensor
by tensor (normal(0, 0.02) weights, unit norms) with llmopt's streaming writer rather than with
``from_config`` → ``save_pretrained``, which would hold the whole model (13.5 GB for 7B) on a shared machine.
Results go to ``WORKDIR/probe.json``; ``--markdown`` prints the table for docs/scale.md. Run under
``flock /tmp/llmopt-heavy.lock``: it is heavy. Outputs are deleted as soon as the next stage no longer needs
them unless ``--keep``.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "smoke": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,  # a dry run
                  num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}
LLMOPT = [str(ROOT / ".venv" / "bin" / "llmopt"), "-q"]


def make_checkpoint(shape: str, out: Path, shard_gb: float = 2.0) -> dict:
    """Random bf16 weights of ``shape``, written tensor by tensor into 2 GB shards with an index."""
    import transformers

    from llmopt.models import presets
    from llmopt.models.loader import expected_tensors
    from llmopt.models.registry import spec_for
    from llmopt.models.safetensors_io import CheckpointWriter, TensorSpec

    if (out / "config.json").exists():
        return json.loads((out / "probe-source.json").read_text())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = transformers.LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                                   dtype="bfloat16")
    spec = spec_for("llama")
    expected, _ = expected_tensors(cfg, spec)
    plan = [TensorSpec(n, torch.bfloat16, s) for n, s in expected.items()]
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    with CheckpointWriter(tmp, plan, int(shard_gb * 1e9), metadata={"format": "pt"}) as w:
        for s in plan:
            if len(s.shape) == 1:
                t = torch.ones(s.shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(s.shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
            w.write(s.name, t)
            del t
    cfg.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # a tokenizer for calibration / eval text (ids < 4096)
        shutil.copy2(presets.TINY_TRAINED / f, tmp / f)
    info = {"shape": shape, "config": SHAPES[shape], "dtype": "bfloat16", "shards": len(w.files),
            "bytes": sum(s.nbytes for s in plan), "parameters": sum(torch.Size(s.shape).numel() for s in plan),
            "make_s": round(time.perf_counter() - t0, 1)}
    (tmp / "probe-source.json").write_text(json.dumps(info, indent=2))
    tmp.rename(out)
    return info


def measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` as a child; its wall time, peak RSS (GNU time's %M of that process) and exit code."""
    tfile = log.with_suffix(".time")
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        rc = subprocess.run(["/usr/bin/time", "-f", "%M %e", "-o", str(tfile), *cmd], stdout=lf, stderr=lf).returncode
    wall = time.perf_counter() - t0
    rss_kb = int(tfile.read_text().split()[-2]) if tfile.exists() else 0
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(wall, 1), "peak_rss_mb": round(rss_kb / 1024, 1),
            "log": str(log)}


def from_manifest(out: Path) -> dict:
    """What the stage recorded about itself: its sampled peak and, for calibrated quantize, the calibration
    activations it reports holding (the target is relative to them)."""
    try:
        md = json.loads((out / "manifest.json").read_text())["metadata"]
    except (OSError, ValueError, KeyError):
        return {}
    got = {"sampled_peak_rss_bytes": md.get("resources", {}).get("measured", {}).get("peak_rss_bytes")}
    cal = md.get("calibration") or {}
    if "activation_bytes" in cal:
        got["activation_bytes"] = cal["activation_bytes"]
        got["calibration_batch"] = cal.get("batch")
    if md.get("error_summary"):
        got["error_summary"] = md["error_summary"]
    return got


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_chain(args: argparse.Namespace, work: Path, source: dict) -> dict:
    src = work / "hf"
    paths = {"load": work / "ckpt", "quantize": work / "q", "export": work / "onnx", "build": work / "engine",
             "validate": work / "report"}
    q_args = ["--method", args.method, "--bits", "4", "--group-size", "128"]
    if args.method != "rtn":
        q_args += ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    cmds = {
        "load": [*LLMOPT, "load", str(src), "-o", str(paths["load"]), "--force"],
        "quantize": [*LLMOPT, "quantize", str(paths["load"]), "-o", str(paths["quantize"]), *q_args, "--force"],
        "export": [*LLMOPT, "export", str(paths["quantize"]), "-o", str(paths["export"]), "--force"],
        "build": [*LLMOPT, "build", str(paths["export"]), "-o", str(paths["build"]), "--force"],
        "validate": [*LLMOPT, "validate", str(paths["build"]), "-o", str(paths["validate"]), "--eval-tokens", "256",
                     "--decode-tokens", "4", "--no-gates"],  # random weights: memory, not quality, is measured
    }
    results = {}
    for stage in args.stages:
        print(f"[{time.strftime('%H:%M:%S')}] {stage}: {' '.join(cmds[stage])}", file=sys.stderr)
        r = measured(cmds[stage], work / f"{stage}.log")
        r["output_bytes"] = du(paths[stage])
        r["peak_rss_vs_checkpoint"] = round(r["peak_rss_mb"] * 2**20 / source["bytes"], 3)
        r.update(from_manifest(paths[stage]))
        results[stage] = r
        print(f"    rc {r['rc']}  {r['wall_s']} s  peak RSS {r['peak_rss_mb']} MB "
              f"({r['peak_rss_vs_checkpoint']}x checkpoint)", file=sys.stderr)
        (work / "probe.json").write_text(json.dumps({"source": source, "stages": results}, indent=2))
        if r["rc"] != 0:
            print(open(r["log"]).read()[-2000:], file=sys.stderr)
            break
        if args.prune:  # disk: drop what no later stage reads (validate needs both checkpoints)
            drop = {"load": [src], "quantize": [] if "validate" in args.stages else [paths["load"]]}.get(stage, [])
            for p in drop:
                shutil.rmtree(p, ignore_errors=True)
    return results


def run_genai(work: Path, source: dict) -> dict:
    """ONNX Runtime GenAI's model builder (int4, cpu) on the same HF directory, in its own venv."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_peers import peers_python

    py = peers_python()
    out = work / "genai-int4"
    cmd = [str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(work / "genai-cache")]
    r = measured(cmd, work / "genai.log")
    r["output_bytes"] = du(out)
    r["peak_rss_vs_checkpoint"] = round(r["peak_rss_mb"] * 2**20 / source["bytes"], 3)
    shutil.rmtree(work / "genai-cache", ignore_errors=True)
    return r


def markdown(data: dict) -> str:
    s = data["source"]
    gb = s["bytes"] / 1e9
    lines = [f"**{s['shape']}** ({s['parameters'] / 1e9:.2f}B parameters, bf16, {gb:.1f} GB in {s['shards']} shards)", "",
             "| stage | wall time | peak RSS | RSS / checkpoint | output |", "|---|---|---|---|---|"]
    for name, r in {**data["stages"], **({"GenAI builder int4": data["genai"]} if "genai" in data else {})}.items():
        status = "" if r["rc"] == 0 else f" (exit {r['rc']})"
        act = f" (calibration activations {r['activation_bytes'] / 1e6:.0f} MB)" if "activation_bytes" in r else ""
        lines.append(f"| {name}{status} | {r['wall_s']:.0f} s | {r['peak_rss_mb'] / 1024:.2f} GB{act} | "
                     f"{r['peak_rss_vs_checkpoint']:.2f}× | {r['output_bytes'] / 1e9:.2f} GB |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llmopt-probe"))
    ap.add_argument("--stages", default="load,quantize,export,build,validate")
    ap.add_argument("--method", choices=["rtn", "gptq", "awq"], default="rtn")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--genai", action="store_true", help="also run ONNX Runtime GenAI's builder (own venv)")
    ap.add_argument("--keep", action="store_true", help="keep every output (default: delete the work dir)")
    ap.add_argument("--prune", action="store_true", help="delete the source after load and the float checkpoint "
                                                         "after quantize (when validate is not run): 27 GB less for 7B")
    ap.add_argument("--markdown", action="store_true", help="print the docs/scale.md table of WORKDIR/probe.json")
    args = ap.parse_args()
    work = args.workdir.resolve()
    if args.markdown:
        print(markdown(json.loads((work / "probe.json").read_text())))
        return 0
    args.stages = [s for s in args.stages.split(",") if s]
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"making {args.shape} bf16 checkpoint in {work / 'hf'}", file=sys.stderr)
    source = make_checkpoint(args.shape, work / "hf")
    data = {"source": source, "method": args.method, "stages": run_chain(args, work, source)}
    if args.genai:
        data["genai"] = run_genai(work, source)
    (work / "probe.json").write_text(json.dumps(data, indent=2))
    print(markdown(data))
    if not args.keep:
        for p in work.iterdir():
            if p.name != "probe.json" and p.suffix not in (".log", ".time"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

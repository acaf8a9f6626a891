"""Every shipped ONNX Runtime recipe on the real SmolLM2-135M-Instruct, as shipped (only the source set),
then each engine's quality on held-out Python documentation text — the numbers of docs/real-model.md.

    .venv/bin/python scripts/smollm2_recipes.py [--workdir work/smollm2] [--recipes int8-rtn,int4-gptq]

For each ``recipes/*.yaml`` that is not TensorRT: ``llmopt convert RECIPE --set model.source=<gguf>``
(stage times from the manifests, gate results from the report), then ``llmopt validate ENGINE
--eval-text python-docs.txt`` for perplexity / KL / top-1 against the fp32 checkpoint. The Python text is
the docstrings of a fixed list of standard-library modules (:func:`python_docs_text`): English technical
prose that neither the calibration text (man pages) nor the model's own eval text contains.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMOPT = str(ROOT / ".venv" / "bin" / "llmopt")
DOC_MODULES = ("argparse", "collections", "functools", "itertools", "json", "pathlib", "re", "textwrap",
               "logging", "subprocess", "shutil", "tempfile", "datetime", "decimal", "fractions", "statistics",
               "string", "csv", "heapq", "bisect")


def python_docs_text(min_chars: int = 60000) -> str:
    """Docstrings of the public classes, functions and methods of :data:`DOC_MODULES`, in a fixed order."""
    import importlib

    parts: list[str] = []
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        if mod.__doc__:
            parts.append(inspect.cleandoc(mod.__doc__))
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                parts.append(f"{attr}\n{doc}")
    text = "\n\n".join(parts)
    if len(text) < min_chars:
        raise SystemExit(f"only {len(text)} characters of Python documentation text")
    return text


def recipes(selected: list[str] | None) -> list[Path]:
    found = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if not p.stem.startswith("trt-"))
    return [p for p in found if not selected or p.stem in selected]


def convert(recipe: Path, gguf: Path, work: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([LLMOPT, "-q", "convert", str(recipe), "-w", str(work), "--set", f"model.source={gguf}", "--json"],
                       capture_output=True, text=True)
    out = {"recipe": recipe.stem, "rc": r.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    try:
        out["result"] = json.loads(r.stdout)
    except ValueError:
        out["stderr"] = r.stderr[-1500:]
    times, rss = {}, {}
    for d in ("checkpoint", "quantized", "onnx", "engine", "report"):
        m = work / d / "manifest.json"
        if m.exists():
            man = json.loads(m.read_text())
            times[man["stage"]] = man["duration_s"]
            measured = ((man.get("metadata") or {}).get("resources") or {}).get("measured") or {}
            if "peak_rss_gb" in measured:
                rss[man["stage"]] = measured["peak_rss_gb"]
    out["stage_s"], out["peak_rss_gb"] = times, rss
    report = work / "report" / "report.json"
    if report.exists():
        rep = json.loads(report.read_text())
        out["passed"] = rep["passed"]
        out["checks"] = [{k: c[k] for k in ("name", "section", "value", "threshold", "passed")} for c in rep["checks"]]
        out["engine_bytes"] = rep.get("artifact_bytes")
    return out


def held_out(engine: Path, text: Path, out: Path, tokens: int) -> dict:
    r = subprocess.run([LLMOPT, "-q", "validate", str(engine), "-o", str(out), "--eval-text", str(text), "--json",
                        "--eval-tokens", str(tokens), "--decode-tokens", "32"], capture_output=True, text=True)
    rep = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    q = rep.get("quantization") or rep.get("conversion") or {}
    tf = q.get("teacher_forced", {})
    return {"rc": r.returncode, "tokens": tf.get("tokens"), "ppl_reference": tf.get("ppl_reference"),
            "ppl": tf.get("ppl_artifact"), "ppl_increase_pct": tf.get("ppl_increase_pct"), "kl_mean": tf.get("kl_mean"),
            "top1": tf.get("top1_agreement"), "greedy": (q.get("greedy") or {}).get("agreement")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "smollm2")
    ap.add_argument("--recipes", default="", help="comma-separated recipe names (default: all non-TensorRT)")
    ap.add_argument("--held-out-tokens", type=int, default=5120, help="teacher-forced tokens of the held-out "
                    "validation (0: skip it; the recipe's own validate still runs)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_smollm2 import fetch

    gguf = fetch()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    text = work / "python-docs.txt"
    text.write_text(python_docs_text())
    results = []
    for recipe in recipes([r for r in args.recipes.split(",") if r]):
        print(f"[{time.strftime('%H:%M:%S')}] {recipe.stem}", file=sys.stderr)
        res = convert(recipe, gguf, work / recipe.stem)
        if args.held_out_tokens and (work / recipe.stem / "engine" / "manifest.json").exists():
            res["python_docs"] = held_out(work / recipe.stem / "engine", text, work / recipe.stem / "report-python-docs",
                                          args.held_out_tokens)
        print(json.dumps({k: res.get(k) for k in ("rc", "wall_s", "stage_s", "peak_rss_gb", "passed", "checks",
                                                   "python_docs")}), file=sys.stderr)
        results.append(res)
        found = work / "results.json"
        previous = [r for r in (json.loads(found.read_text()) if found.exists() else []) if r["recipe"] != res["recipe"]]
        found.write_text(json.dumps(previous + [res], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

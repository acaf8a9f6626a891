"""Print the quantization quality table on the embedded model, as `llmopt validate` reports it.

Runs `llmopt convert` for fp32 and each quantization scheme (recipes/quickstart.yaml with --set
overrides) in one work directory and reads every report.json. Not a test; takes ~15 min on 2 cores.

    .venv/bin/python scripts/quant_table.py [-w work/quant-table]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = {
    "fp32": [],
    "int8 RTN": ["quantize.method=rtn", "quantize.bits=8", "quantize.group_size=null"],
    "W8A8 SmoothQuant": ["quantize.method=smoothquant", "quantize.bits=8", "quantize.group_size=null"],
    **{f"int4 {m.upper()} g{g}": [f"quantize.method={m}", "quantize.bits=4", f"quantize.group_size={g}"]
       for g in (32, 128) for m in ("rtn", "gptq", "awq")},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-w", "--workdir", type=Path, default=ROOT / "work" / "quant-table")
    args = ap.parse_args()
    rows = []
    for label, sets in SCHEMES.items():
        wd = args.workdir / label.replace(" ", "-").lower()
        cmd = [sys.executable, "-m", "llmopt", "-q", "convert", str(ROOT / "recipes" / "quickstart.yaml"), "-w", str(wd),
               "--set", "validate.gates={}"]
        if sets:
            cmd += ["--set", "quantize.calibration.samples=64"]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True)
        rep = json.loads((wd / "report" / "report.json").read_text())
        q = rep.get("quantization", rep["conversion"])
        tf = q["teacher_forced"]
        rows.append((label, tf["ppl_artifact"], tf["ppl_increase_pct"], tf["kl_mean"], tf["top1_agreement"],
                     q["greedy"]["agreement"], rep["artifact_bytes"]))
        print(f"done: {label}", file=sys.stderr)
    print("| scheme | perplexity | Δ ppl % | mean KL | top-1 | greedy agreement (32 tok) | bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:+.3f} | {r[3]:.2e} | {r[4]:.4f} | {r[5]:.3f} | {r[6] / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()

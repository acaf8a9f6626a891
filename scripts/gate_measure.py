"""Measure what the default validation gates gate: run recipes ungated, print each artifact's numbers
next to its default row (docs/validate.md was written from this output).

    python scripts/gate_measure.py --workdir /tmp/gates                # every shipped CPU recipe
    python scripts/gate_measure.py --workdir /tmp/gates quickstart int4-gptq --set build.kv_cache=int8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_RECIPES = ["quickstart", "int8-rtn", "int4-gptq", "int4-awq", "int4-cpu-fast", "w8a8-smoothquant"]
COLUMNS = [("max_logits_rel_error", "conversion", lambda s: s["logits"]["max_rel"]),
           ("min_greedy_agreement", "conversion", lambda s: s["greedy"]["agreement"]),
           ("max_ppl_increase_pct", "quality", lambda s: s["teacher_forced"]["ppl_increase_pct"]),
           ("min_top1_agreement", "quality", lambda s: s["teacher_forced"]["top1_agreement"]),
           ("max_kl", "quality", lambda s: s["teacher_forced"]["kl_mean"])]


def row(name: str, work: Path) -> str:
    from llmopt.artifact import lineage, open_artifact
    from llmopt.gates import default_gates, modifiers_of, profile_of

    report = json.loads((work / "report" / "report.json").read_text())
    profile = profile_of(lineage(open_artifact(work / "engine")))
    gates = default_gates(profile)
    cells = []
    for gate, section, get in COLUMNS:
        s = report["quantization" if section == "quality" and "quantization" in report else "conversion"]
        value, limit = get(s), gates[gate]
        ok = value >= limit if gate.startswith("min_") else value <= limit
        cells.append(f"{value:.3g}{'' if ok else ' ✗'}")
    kind = " + ".join([profile["weights"], *modifiers_of(profile)])
    return f"| {name} | {kind} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", default=CPU_RECIPES)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    lines = ["| recipe | default row | logits max rel | greedy | ppl Δ % | top-1 | mean KL |", "|---" * 7 + "|"]
    for name in args.recipes:
        tag = name + "".join(f"+{o.split('=')[0].split('.')[-1]}={o.split('=', 1)[1]}" for o in args.overrides)
        work = args.workdir / tag.replace("/", "_")
        cmd = [sys.executable, "-m", "llmopt", "-q", "convert", str(ROOT / "recipes" / f"{name}.yaml"), "-w", str(work),
               "--set", "validate.gates=none", *[x for o in args.overrides for x in ("--set", o)]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{tag}: convert exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        lines.append(row(tag, work))
        print(lines[-1], file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

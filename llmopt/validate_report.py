"""Gates over a validation report, and its JSON / Markdown renderings."""

from __future__ import annotations

import json
from pathlib import Path

from llmopt.recipe import Gates


def _check(name: str, section: str, value: float | bool, threshold: float | None, op: str) -> dict:
    if op == "ok":
        passed: bool | None = bool(value)
    elif threshold is None:
        passed = None
    elif op == "<=":
        passed = value <= threshold
    else:
        passed = value >= threshold
    return {"name": name, "section": section, "value": value, "op": op, "threshold": threshold, "passed": passed}


def evaluate_gates(report: dict, gates: Gates) -> list[dict]:
    conv = report["conversion"]
    quality_name = "quantization" if "quantization" in report else "conversion"
    quality = report[quality_name]
    checks = [
        _check("io names and dtypes match io.json", "conversion", not report["io"]["problems"], None, "ok"),
        _check("logits shape [batch, seq, vocab]", "conversion", conv["logits"]["shape_ok"], None, "ok"),
        _check("logits max relative error", "conversion", conv["logits"]["max_rel"], gates.max_logits_rel_error, "<="),
        _check("greedy agreement", "conversion", conv["greedy"]["agreement"], gates.min_greedy_agreement, ">="),
        _check("perplexity increase %", quality_name, quality["teacher_forced"]["ppl_increase_pct"],
               gates.max_ppl_increase_pct, "<="),
        _check("top-1 agreement", quality_name, quality["teacher_forced"]["top1_agreement"], gates.min_top1_agreement, ">="),
        _check("mean KL divergence", quality_name, quality["teacher_forced"]["kl_mean"], gates.max_kl, "<="),
    ]
    if quality_name == "quantization":
        checks += [
            _check("greedy agreement vs unquantized", "quantization", quality["greedy"]["agreement"], None, ">="),
            _check("top-1 agreement vs own checkpoint", "conversion", conv["teacher_forced"]["top1_agreement"], None, ">="),
        ]
    return checks


def _fmt(v: float | bool) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def check_line(c: dict) -> str:
    mark = {True: "✓", False: "✗", None: "·"}[c["passed"]]
    limit = "" if c["threshold"] is None else f" (gate {c['op']} {_fmt(c['threshold'])})"
    value = "" if c["op"] == "ok" else f": {_fmt(c['value'])}"
    return f"{mark} [{c['section']}] {c['name']}{value}{limit}"


def failures(checks: list[dict]) -> list[str]:
    """One short phrase per failed check: the gate and by how much, e.g. 'top-1 agreement 0.002 < 0.93'."""
    out = []
    for c in checks:
        if c["passed"] is not False:
            continue
        if c["op"] == "ok":
            out.append(c["name"])
        else:
            op = "<" if c["op"] == ">=" else ">"
            out.append(f"{c['name']} {_fmt(c['value'])} {op} {_fmt(c['threshold'])}")
    return out


def verdict(report: dict) -> str:
    """PASSED / FAILED, or UNGATED when gating was explicitly turned off (numbers only)."""
    if not report["passed"]:
        return "FAILED"
    return "PASSED" if report.get("gates", {}).get("gated", True) else "UNGATED"


def render_markdown(report: dict) -> str:
    gates = report.get("gates", {})
    lines = [f"# Validation report: {verdict(report)}", "",
             f"- artifact: `{report['artifact']}` ({report['backend']}, {report['artifact_bytes'] / 1e6:.1f} MB)", ""]
    lines += ["## Checks", ""] + ([f"Gates: {gates['source']}.", ""] if gates else []) \
        + [f"- {check_line(c)}" for c in report["checks"]] + [""]
    for name in ("conversion", "quantization"):
        if name not in report:
            continue
        s = report[name]
        tf, g, lg = s["teacher_forced"], s["greedy"], s["logits"]
        lines += [f"## {name} (reference `{s['reference']}`)", "",
                  "| measure | value |", "|---|---|",
                  f"| logits max abs / rel (prefill, padded batch {lg['lengths']}) | {lg['prefill']['max_abs']:.3g} / {lg['prefill']['max_rel']:.3g} |",
                  f"| logits max abs / rel (decode step) | {lg['decode']['max_abs']:.3g} / {lg['decode']['max_rel']:.3g} |",
                  f"| perplexity reference / artifact | {tf['ppl_reference']:.4f} / {tf['ppl_artifact']:.4f} ({tf['ppl_increase_pct']:+.3f}%) |",
                  f"| mean KL / p99 KL | {tf['kl_mean']:.3g} / {tf['kl_p99']:.3g} |",
                  f"| top-1 agreement ({tf['tokens']} tokens) | {tf['top1_agreement']:.4f} |",
                  f"| greedy agreement over {g['new_tokens']} tokens | {g['agreement']:.4f} (first divergence {g['first_divergence']}) |",
                  ""]
    lat = report["latency"]
    lines += ["## Latency", "", f"- prefill {lat['prompt_tokens']} tokens: {lat['prefill_ms']:.1f} ms",
              f"- decode: {lat['decode_ms_median']:.2f} ms/token median, {lat['decode_ms_p90']:.2f} p90 "
              f"({lat['tokens_per_s']:.1f} tokens/s)", ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(render_markdown(report))

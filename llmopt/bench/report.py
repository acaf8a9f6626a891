"""bench report rendering: the one-line-per-system table (and per-op profiles) on a rich console."""

from __future__ import annotations

from typing import Any


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

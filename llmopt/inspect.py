"""inspect: an artifact's manifest, lineage and I/O at a glance."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmopt.artifact import lineage, open_artifact
from llmopt.readers import check_io_json


def describe(directory: Path) -> dict:
    art = open_artifact(directory)
    m = art.manifest
    info = {
        "path": str(art.path), "stage": m["stage"], "kind": m["kind"], "key": m["key"],
        "created_at": m["created_at"], "duration_s": m["duration_s"], "llmopt_version": m["llmopt_version"],
        "config": m["config"], "metadata": m["metadata"], "environment": m["environment"],
        "files": m["files"], "bytes": sum(f["bytes"] for f in m["files"].values()),
        "lineage": [{"stage": a.stage, "kind": a.kind, "path": str(a.path), "key": a.key} for a in lineage(art)],
    }
    if (art.path / "io.json").exists():
        info["io"] = check_io_json(art.path)
    info["next_stage_estimate"] = next_stage_estimate(art)
    return info


def next_stage_estimate(art) -> dict | None:  # noqa: ANN001
    """What the stage that reads this artifact would need with default settings (headers only)."""
    from llmopt import estimates
    from llmopt.recipe import BuildConfig, ExportConfig

    if art.kind == "checkpoint":
        return {"stage": "export", **estimates.export_estimate(ExportConfig(), [art]).to_json()}
    if art.kind == "onnx":
        return {"stage": "build", **estimates.build_estimate(BuildConfig(), [art]).to_json()}
    return None


def render(info: dict, console: Console) -> None:
    console.print(f"[bold]{info['kind']}[/] artifact from [bold]{info['stage']}[/] at {info['path']}")
    console.print(f"key {info['key'][:16]}…  created {info['created_at']}  in {info['duration_s']:.1f}s  "
                  f"{info['bytes'] / 1e6:.1f} MB")
    t = Table("lineage", "kind", "path", "key", box=None)
    for i, a in enumerate(info["lineage"]):
        t.add_row(("└─ " if i else "") + a["stage"], a["kind"], a["path"], a["key"][:12])
    console.print(t)
    if "io" in info:
        io = info["io"]
        t = Table("io", "dtype", "shape", box=None)
        for x in io["inputs"][:5] + io["outputs"][:3]:
            t.add_row(x["name"], x["dtype"], str(x["shape"]))
        console.print(t)
        g = lambda k: io.get(k, "?")  # noqa: E731
        console.print(f"{g('num_layers')} layers, {g('num_heads')} heads / {g('num_kv_heads')} KV heads, "
                      f"head_dim {g('head_dim')}, vocab {g('vocab_size')}, KV layout {g('kv_layout')}")
    res = info["metadata"].get("resources")
    if res:
        m, e = res["measured"], res.get("estimate")
        console.print(f"resources: peak RSS {m['peak_rss_bytes'] / 1e9:.2f} GB"
                      + (f" (estimated {e['peak_rss_bytes'] / 1e9:.2f} GB)" if e else "")
                      + f", wrote {m['disk_bytes'] / 1e9:.2f} GB in {m['seconds']:.1f}s", highlight=False)
    nxt = info.get("next_stage_estimate")
    if nxt:
        console.print(f"{nxt['stage']} (defaults) would need ~{nxt['peak_rss_bytes'] / 1e9:.2f} GB RSS, "
                      f"~{nxt['disk_bytes'] / 1e9:.2f} GB disk, ~{nxt['seconds']:.0f}s", highlight=False)
    md = {k: v for k, v in info["metadata"].items() if not isinstance(v, (dict, list))}
    if md:
        console.print("metadata: " + ", ".join(f"{k}={v}" for k, v in md.items()), highlight=False)

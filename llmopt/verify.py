"""verify: an artifact and every ancestor in its lineage, file by file against their manifests.

The artifact itself must be complete and match its file table. Ancestors are followed through every
input of every manifest; an ancestor whose path no longer holds the build the manifest recorded (a copied
engine, a deleted or rebuilt checkpoint) is reported as not reachable, which is not a failure: an engine
directory is self-contained. A reachable ancestor that differs from its own manifest is a failure.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from llmopt.artifact import Artifact, ancestor, load_manifest, problems_of
from llmopt.errors import UserError


def _entry(art: Artifact, depth: int) -> dict:
    problems = problems_of(art.path, art.manifest, use_cache=False)
    return {"path": str(art.path), "stage": art.stage, "kind": art.kind, "key": art.key, "depth": depth,
            "status": "ok" if not problems else "mismatch", "files": len(art.manifest["files"]),
            "bytes": sum(f.get("bytes", 0) for f in art.manifest["files"].values() if isinstance(f, dict)),
            "problems": [p.line(art.path) for p in problems]}


def verify(directory: Path) -> dict:
    p = Path(directory)
    if not p.is_dir():
        raise UserError(f"{p}: no such artifact directory", "pass the output directory of an llmopt stage")
    manifest = load_manifest(p)
    if manifest is None:
        raise UserError(f"{p}: not a complete llmopt artifact (no valid manifest.json)", "rerun the stage that writes it")
    entries = [_entry(Artifact(p.resolve(), manifest), 0)]
    todo = [(manifest, 1)]
    seen = {manifest["key"]}
    while todo:
        m, depth = todo.pop(0)
        for ref in m.get("inputs", []):
            found, why = ancestor(ref)
            if found is None:
                entries.append({"path": ref.get("path") if isinstance(ref, dict) else None,
                                "kind": ref.get("kind") if isinstance(ref, dict) else None,
                                "key": ref.get("key") if isinstance(ref, dict) else None,
                                "depth": depth, "status": why, "problems": []})
                continue
            if found.key in seen:
                continue
            seen.add(found.key)
            entries.append(_entry(found, depth))
            todo.append((found.manifest, depth + 1))
    ok = all(e["status"] != "mismatch" for e in entries)
    return {"path": str(p.resolve()), "ok": ok, "artifacts": entries,
            "not_reachable": sum(e["status"].startswith("not reachable") for e in entries)}


def render(info: dict, console: Console) -> None:
    for e in info["artifacts"]:
        mark = {"ok": "[green]✓[/]", "mismatch": "[red]✗[/]"}.get(e["status"], "[yellow]·[/]")
        what = f"{e.get('stage', '?')} ({e['kind']})"
        size = f", {e['files']} files, {e['bytes'] / 1e6:.1f} MB" if "files" in e else ""
        console.print(f"{'  ' * e['depth']}{mark} {what} {e['path']}: {e['status']}{size}", highlight=False)
        for line in e["problems"]:
            console.print(f"{'  ' * e['depth']}    {line}", highlight=False, markup=False)

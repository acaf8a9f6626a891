"""Path rules: a name read from a file never leaves its directory; outputs never overlap inputs."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from llmopt.errors import UserError


def safe_join(base: Path, name: object, what: str = "file") -> Path:
    """``base / name`` for a relative ``name`` read from a file, refusing anything that leaves ``base``.

    Refused: non-strings, empty names, absolute paths, ``..`` components, NUL bytes, and names whose
    resolved location (symlinks followed) is outside ``base``.
    """
    base = Path(base)
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UserError(f"{base}: {what} name {name!r} is not a plain relative file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise UserError(f"{base}: {what} {name!r} points outside the directory",
                        "a name read from a file must stay inside that file's directory")
    joined = base / pure
    root = base.resolve()
    if not is_within(joined.resolve(), root):
        raise UserError(f"{base}: {what} {name!r} resolves outside the directory (symbolic link)",
                        "a name read from a file must stay inside that file's directory")
    return joined


def is_within(path: Path, root: Path) -> bool:
    """True when ``path`` is ``root`` or inside it (both already resolved)."""
    return path == root or root in path.parents


def overlap(a: Path, b: Path) -> str | None:
    """How two resolved paths overlap: 'is', 'is inside', 'contains', or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_output(out: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output directory equal to, inside, or containing any input (replacing it would destroy it)."""
    out = Path(out).resolve()
    for what, p in inputs:
        rel = overlap(out, Path(p).resolve())
        if rel is not None:
            raise UserError(f"{out}: output {rel} the {what} {p}",
                            "write the output to a directory outside every input")

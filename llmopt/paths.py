"""Path helpers for names that come from files users hand us (shard indexes, manifests)."""

from __future__ import annotations

from pathlib import Path

from llmopt.errors import UserError


def safe_join(base: Path, name: str, what: str = "file name") -> Path:
    """``base / name`` for a plain relative ``name`` that stays inside ``base``; a user error otherwise.

    Refuses absolute names, ``..`` components, empty names and names resolving outside ``base``
    (through a symlink, say), so an index or manifest cannot point llmopt at files elsewhere.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UserError(f"{base}: invalid {what} {name!r}", "the checkpoint's metadata is corrupt")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")):
        raise UserError(f"{base}: {what} {name!r} points outside the directory",
                        "the checkpoint's metadata may be corrupt or malicious; re-download it")
    joined = Path(base) / p
    root = Path(base).resolve()
    if not joined.resolve().is_relative_to(root):
        raise UserError(f"{base}: {what} {name!r} resolves outside the directory",
                        "the checkpoint's metadata may be corrupt or malicious; re-download it")
    return joined

"""Check an artifact's files against its manifest's file table.

Every read of an artifact checks, for each file in the table: it exists, is a regular file inside the
directory, has the recorded size, and has the recorded sha256. Files that are not in the table (besides
the manifest and the hash cache) are problems too: nothing can be slipped into an artifact.

Hashing costs ~0.3-2 GB/s per core, so a multi-GB artifact is not re-hashed on every read: the
sha256 of a file is cached in the artifact's ``.llmopt-verified.json`` together with the file's
(device, inode, size, mtime_ns, ctime_ns). Any write to a file, or any ``touch``/``utime`` that tries to
hide one, changes its ctime, which the kernel sets and user code cannot; a copy to another directory
or machine gets new inodes. Either way the cache entry no longer matches and the file is hashed again.
The cache is written at commit (the hashes the manifest was made from) and after a full check; a
read-only artifact is simply hashed on every read. ``llmopt verify`` ignores the cache. A file changed
less than 2 s before a read is hashed but not cached (a second write in the same timestamp tick would not
move its ctime); at commit the files are llmopt's own, written under the staging lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
VERIFIED = ".llmopt-verified.json"
# a file changed less than this before it was hashed could change again within the same (coarse, ~ms)
# timestamp tick without moving its ctime: such a hash is not cached (git's "racy" rule)
RACY_NS = 2_000_000_000
NOT_CONTENT = {MANIFEST, VERIFIED, f".{MANIFEST}.tmp", f"{VERIFIED}.tmp"}


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@dataclass(frozen=True)
class Problem:
    file: str
    what: str  # missing | not a file | size | sha256 | extra | bad name

    def line(self, directory: Path) -> str:
        return f"{Path(directory) / self.file}: {self.what}"


def content_files(directory: Path) -> list[str]:
    """Relative posix names of every file in ``directory`` except the manifest and the hash cache."""
    names = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for f in sorted(files):
            rel = (Path(root) / f).relative_to(directory).as_posix()
            if rel not in NOT_CONTENT:
                names.append(rel)
    return names


def hash_many(paths: list[Path]) -> list[str]:
    """sha256 of each file; several files hash on several cores (hashlib releases the GIL)."""
    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def hash_table(directory: Path) -> tuple[dict, dict]:
    """The manifest's file table for ``directory`` and the matching hash-cache entries."""
    names = content_files(directory)
    before = [os.lstat(directory / n) for n in names]
    digests = hash_many([directory / n for n in names])
    files, cache = {}, {}
    for name, st, digest in zip(names, before, digests):
        files[name] = {"sha256": digest, "bytes": st.st_size}
        if fingerprint(os.lstat(directory / name)) == fingerprint(st):
            cache[name] = {"fp": fingerprint(st), "sha256": digest}
    return files, cache


def _read_cache(directory: Path) -> dict:
    try:
        data = json.loads((directory / VERIFIED).read_text())
        return data["files"] if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}
    except (OSError, ValueError, KeyError):
        return {}


def write_cache(directory: Path, entries: dict) -> None:
    """Atomically record verified hashes; an unwritable artifact just goes without the cache."""
    tmp = directory / f"{VERIFIED}.tmp"
    try:
        tmp.write_text(json.dumps({"version": 1, "files": entries}))
        os.replace(tmp, directory / VERIFIED)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def _valid_name(name: object) -> bool:
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        return False
    parts = name.split("/")
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def check_files(directory: Path, table: dict, *, use_cache: bool = True) -> list[Problem]:
    """Every way ``directory`` differs from the manifest's file ``table`` (empty list: it matches)."""
    directory = Path(directory)
    problems: list[Problem] = []
    cache = _read_cache(directory) if use_cache else {}
    fresh: dict = {}
    todo: list[tuple[str, list[int], object]] = []
    if not isinstance(table, dict):
        return [Problem(MANIFEST, "file table is not a mapping")]
    for name, info in table.items():
        if not _valid_name(name) or not isinstance(info, dict):
            problems.append(Problem(str(name), "bad name or entry in the manifest's file table"))
            continue
        p = directory / name
        try:
            st = os.lstat(p)
        except OSError:
            problems.append(Problem(name, "missing (listed in the manifest)"))
            continue
        if not p.is_file() or p.is_symlink():
            problems.append(Problem(name, "not a regular file"))
            continue
        if st.st_size != info.get("bytes"):
            problems.append(Problem(name, f"size {st.st_size} bytes, manifest says {info.get('bytes')}"))
            continue
        fp = fingerprint(st)
        hit = cache.get(name)
        if isinstance(hit, dict) and hit.get("fp") == fp and hit.get("sha256") == info.get("sha256"):
            fresh[name] = hit
        else:
            todo.append((name, fp, info.get("sha256")))
    for (name, fp, want), digest in zip(todo, hash_many([directory / t[0] for t in todo])):
        if digest != want:
            problems.append(Problem(name, "sha256 differs from the manifest (changed after it was written)"))
        elif fingerprint(os.lstat(directory / name)) == fp and time.time_ns() - fp[4] > RACY_NS:
            fresh[name] = {"fp": fp, "sha256": digest}
    listed = set(table)
    problems += [Problem(n, "not in the manifest's file table") for n in content_files(directory) if n not in listed]
    if not problems and fresh != cache:
        write_cache(directory, fresh)
    return problems

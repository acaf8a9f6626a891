"""A tiny-trained GroupQueryAttention engine (with a chat template) and live `llmopt serve` processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from llmopt.models.presets import TINY_TRAINED

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CAPACITY = 256   # envelope total_len max: the KV capacity, so an oversize prompt is cheap to send
MAX_BATCH = 4


@pytest.fixture(scope="session")
def serve_engine(tmp_path_factory) -> Path:
    """preset:tiny-trained with a ChatML template, fp32, built to an ONNX Runtime GQA engine."""
    from llmopt.cli import main

    root = tmp_path_factory.mktemp("serve")
    src = root / "tiny-trained-chat"
    shutil.copytree(TINY_TRAINED, src)
    (src / "chat_template.jinja").write_text(CHATML)
    assert main(["-q", "load", str(src), "-o", str(root / "ckpt")]) == 0
    assert main(["-q", "export", str(root / "ckpt"), "-o", str(root / "onnx")]) == 0
    assert main(["-q", "build", str(root / "onnx"), "-o", str(root / "engine"), "--attention", "gqa",
                 "--batch", f"1,1,{MAX_BATCH}", "--input-len", "1,32,128", "--total-len", f"1,128,{CAPACITY}"]) == 0
    return root / "engine"


@dataclass
class Server:
    proc: subprocess.Popen
    ready: dict
    stderr: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.ready["url"]

    @property
    def model(self) -> str:
        return self.ready["model"]

    def client(self, **kw):  # noqa: ANN201
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples without labels, by name (e.g. llmopt_generated_tokens_total)."""
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_server(engine: Path, *args: str, timeout: float = 180) -> Server:
    """`llmopt serve ENGINE --port 0 --json ARGS`; returns once the ready line is printed (port accepting)."""
    cmd = [sys.executable, "-m", "llmopt", "serve", str(engine), "--port", "0", "--json", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    server = Server(proc, {})
    threading.Thread(target=lambda: server.stderr.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()  # blocks until ready (or the process exits and closes stdout)
    if not line or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"llmopt serve did not start: rc={proc.wait()} stderr={''.join(server.stderr)[-2000:]}")
    server.ready = json.loads(line)
    assert httpx.get(server.url + "/health").status_code == 200
    return server


@pytest.fixture(scope="module")
def server(serve_engine):
    s = start_server(serve_engine)
    yield s
    assert s.stop() == 0, "".join(s.stderr)[-2000:]

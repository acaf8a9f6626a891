"""bench settings: the timing constants, BenchConfig, and System (one thing to time and how to start its worker)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

BASELINES = ("torch", "torch-compile")
WARMUP_STEPS = 2           # decode steps of each generation left out of the statistics
CONTEXT_STEPS = 24         # decode steps timed at each context length
LOAD_TIMEOUT_S = 900       # torch.compile compiles during its warm-up
STEP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class BenchConfig:
    prompt_len: int = 128
    new_tokens: int = 64
    threads: int | None = None
    repeat: int = 3
    contexts: tuple[int, ...] = (128, 512, 1024)
    seed: int = 0
    profile: bool = False


@dataclass
class System:
    """One thing to time: how to start its worker and what to tell it to load."""

    name: str
    kind: str                          # artifact | torch | torch-compile | a peer's own kind
    load: dict                         # the worker's load command (without "cmd")
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "llmopt.bench"])
    env: dict | None = None
    extra: dict = field(default_factory=dict)  # load facts a foreign worker cannot tell (weight_bytes, artifact_bytes)

"""The contract every stage implements.

A stage never prints, never picks paths and never reads globals: the runner gives it its typed
config, its input artifacts and an empty staging directory; it writes files there and returns the
stage-specific metadata that goes into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from llmopt.artifact import Artifact
from llmopt.progress import Progress

RunFn = Callable[[Any, list[Artifact], Path, Progress], dict]


@dataclass(frozen=True)
class Stage:
    name: str                      # subcommand / recipe section name
    kind: str                      # artifact kind it writes: checkpoint | onnx | engine | report
    version: int                   # bump when the output for the same inputs changes
    config_model: type[BaseModel]
    run: RunFn
    input_kinds: tuple[str, ...] = ()
    packages: tuple[str, ...] = field(default=("torch", "transformers"))  # versions that change the output
    # the file the stage reads when its config leaves a path unset (shipped text): its content is in the key
    default_file: Callable[[Any], Path | None] = lambda config: None
    # predicted peak RSS / disk / time from the config and the inputs' headers (llmopt.estimates); None: unknown
    estimate: Callable[[Any, list[Artifact]], Any] = lambda config, inputs: None
    # what else decides the output besides config and input keys (validate: the effective default gates)
    key_extra: Callable[[Any, list[Artifact]], Any] = lambda config, inputs: None

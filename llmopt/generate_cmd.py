"""`llmopt generate`: prompt (raw, or through the chat template) → the shared loop → streamed text.

The engine's own assets say how to tokenize, which ids end a generation and which sampling defaults
apply (llmopt.runtime.assets); flags override the defaults. Text streams as it is produced: to stdout,
or to stderr when ``--json`` keeps stdout for the JSON document.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, TextIO

from llmopt.errors import UserError
from llmopt.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    prompts: list[str]
    max_new_tokens: int = 256
    chat: bool = False
    system: str | None = None
    stop: tuple[str, ...] = ()
    temperature: float | None = None    # None: the engine's generation config decides
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    threads: int | None = None


def sampling_params(req: GenerateRequest, defaults: SamplingParams) -> SamplingParams:
    given = {k: v for k, v in (("temperature", req.temperature), ("top_k", req.top_k), ("top_p", req.top_p),
                               ("repetition_penalty", req.repetition_penalty), ("seed", req.seed)) if v is not None}
    try:
        return replace(defaults, **given)
    except ValueError as exc:
        raise UserError(f"invalid sampling options: {exc}", "see llmopt generate --help") from None


def _check(req: GenerateRequest) -> None:
    if not req.prompts or any(not p.strip() for p in req.prompts):
        raise UserError("--prompt is empty", "pass the text to continue, or a question with --chat")
    if req.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {req.max_new_tokens}: must be at least 1")
    if req.system is not None and not req.chat:
        raise UserError("--system needs --chat", "add --chat to use the chat template")


def run_generate(engine: Path, req: GenerateRequest, stream: TextIO | None = None,
                 log: Callable[[str], None] = lambda m: None) -> dict:
    """Generate for every prompt; streams text to ``stream`` when there is one prompt. Returns the JSON."""
    from llmopt.artifact import open_artifact
    from llmopt.runtime import assets as A
    from llmopt.runtime.generate import complete
    from llmopt.runtime.open import open_session

    _check(req)
    art = open_artifact(engine)
    assets = A.find(art)
    params = sampling_params(req, assets.sampling_defaults())
    prompts = [assets.chat_prompt(p, req.system) if req.chat else assets.prompt(p) for p in req.prompts]
    if any(not p for p in prompts):
        raise UserError("the prompt has no tokens after tokenization", "pass some text with --prompt")
    session = open_session(art, threads=req.threads)
    max_new = req.max_new_tokens
    capacity = getattr(session, "capacity", None)
    if capacity is not None:
        room = capacity - max(len(p) for p in prompts)
        if room < 1:
            raise UserError(f"the prompt has {max(len(p) for p in prompts)} tokens; this engine holds {capacity}",
                            "shorten the prompt or rebuild with a larger envelope total_len")
        if room < max_new:
            log(f"max new tokens capped at {room} by the engine's KV capacity of {capacity}")
            max_new = room

    def on_text(row: int, piece: str) -> None:
        if stream is not None and len(prompts) == 1:
            stream.write(piece)
            stream.flush()

    result = complete(session, assets.tokenizer, prompts, max_new, params, stop=req.stop, eos_ids=assets.eos_ids,
                      on_text=on_text, pad_id=assets.pad_id)
    if stream is not None:
        if len(prompts) == 1:
            stream.write("\n")
        else:
            for p, c in zip(req.prompts, result.completions):
                stream.write(f"### {p}\n{c.text}\n")
        stream.flush()
    first = result.completions[0]
    return {"engine": str(art.path), "backend": session.backend, "chat": req.chat,
            "assets": {"directory": str(assets.directory), "inside_engine": assets.inside},
            "sampling": asdict(params), "stop": list(req.stop), "eos_ids": assets.eos_ids, "max_new_tokens": max_new,
            "text": first.text, "token_ids": first.token_ids, "finish_reason": first.finish_reason,
            "completions": [{"prompt": p, **asdict(c)} for p, c in zip(req.prompts, result.completions)],
            "timings": result.timings()}


def default_stream(as_json: bool, quiet: bool) -> TextIO | None:
    if not as_json:
        return sys.stdout
    return None if quiet else sys.stderr

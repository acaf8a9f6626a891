"""validate: prove an artifact is faithful to the PyTorch model it came from, with numbers.

Sections: ``conversion`` compares the artifact with its own checkpoint (for a quantized artifact,
the dequantized checkpoint), ``quantization`` compares it with the unquantized checkpoint. Each
runs the same checks through the same generation loop: logits error on a left-padded batch
(compared only where the mask is 1), teacher-forced top-1 / KL / perplexity, and greedy decoding
with the KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmopt.artifact import Artifact, lineage
from llmopt.errors import UserError
from llmopt.gates import effective_gates, profile_of
from llmopt.metrics import logits_error, summarize, token_arrays
from llmopt.models import presets
from llmopt.models.loader import load_tokenizer
from llmopt.progress import Progress
from llmopt.recipe import ValidateConfig
from llmopt.runtime import assets
from llmopt.runtime.base import DecoderSession
from llmopt.runtime.generate import first_divergence, greedy, left_pad
from llmopt.runtime.open import artifact_bytes, open_session
from llmopt.stages.base import Stage
from llmopt.validate_report import evaluate_gates, write_report

WINDOW = 256
WINDOW_BATCH = 4
PROMPT_LENGTHS = (7, 19, 32, 12)


def eval_ids(config: ValidateConfig, tokenizer) -> list[int]:  # noqa: ANN001
    path = Path(config.eval_text) if config.eval_text else presets.DEFAULT_EVAL_TEXT
    if not path.exists():
        raise UserError(f"{path}: eval text not found", "pass --eval-text FILE")
    ids = tokenizer(path.read_text(errors="replace"))["input_ids"]
    if len(ids) < 64:
        raise UserError(f"{path}: eval text has only {len(ids)} tokens", "use a longer text (thousands of tokens)")
    return list(ids[: config.eval_tokens + 1])


def prompts_from(ids: list[int], config: ValidateConfig, tokenizer) -> list[list[int]]:  # noqa: ANN001
    if config.prompts:
        return [tokenizer(p)["input_ids"] for p in config.prompts]
    starts = np.linspace(0, len(ids) - 64, len(PROMPT_LENGTHS)).astype(int)
    return [ids[s:s + n] for s, n in zip(starts, PROMPT_LENGTHS)]


def logits_check(test: DecoderSession, ref: DecoderSession, prompts: list[list[int]]) -> dict:
    ids, mask = left_pad(prompts)
    t_logits, r_logits = test.prefill(ids, mask), ref.prefill(ids, mask)
    shape_ok = t_logits.shape == (*ids.shape, test.dims.vocab_size)
    prefill = logits_error(r_logits, t_logits, mask)
    nxt = r_logits[:, -1].argmax(-1)
    decode = logits_error(ref.decode(nxt), test.decode(nxt))
    return {"batch": len(prompts), "lengths": [len(p) for p in prompts], "shape_ok": bool(shape_ok),
            "logits_shape": list(t_logits.shape), "prefill": prefill, "decode": decode,
            "max_rel": max(prefill["max_rel"], decode["max_rel"])}


def teacher_forced(test: DecoderSession, ref: DecoderSession, ids: list[int], advance) -> dict:  # noqa: ANN001
    n = (len(ids) - 1) // WINDOW
    windows = [ids[i * WINDOW:(i + 1) * WINDOW + 1] for i in range(n)]
    parts = []
    for b in range(0, n, WINDOW_BATCH):
        chunk = np.array(windows[b:b + WINDOW_BATCH], np.int64)
        x, y = chunk[:, :-1], chunk[:, 1:]
        t, r = test.prefill(x), ref.prefill(x)
        parts.append(token_arrays(r.reshape(-1, r.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1)))
        advance(len(chunk))
    return summarize(parts)


def greedy_check(test: DecoderSession, ref: DecoderSession, prompts: list[list[int]], n: int) -> dict:
    a, b = greedy(test, prompts, n), greedy(ref, prompts, n)
    div = first_divergence(a.tokens, b.tokens)
    prefix = [n if d is None else d for d in div]
    return {"new_tokens": n, "prompts": len(prompts), "first_divergence": div,
            "agreement": float(np.mean(prefix) / n), "token_match": float((a.tokens == b.tokens).mean())}


def latency(test: DecoderSession, prompt: list[int], n: int) -> dict:
    greedy(test, [prompt[:8]], 4)  # warm-up
    g = greedy(test, [prompt], n)
    return {"prompt_tokens": len(prompt), "prefill_ms": g.prefill_s * 1e3, "decode_ms_median": g.decode_ms_median,
            "decode_ms_p90": g.decode_ms_p90, "tokens_per_s": 1e3 / g.decode_ms_median}


def section(test: DecoderSession, ref_art: Artifact, ids: list[int], prompts, config: ValidateConfig,
            progress: Progress, label: str) -> dict:
    ref = open_session(ref_art)
    with progress.task(f"{label}: logits on a padded batch"):
        logits = logits_check(test, ref, prompts)
    with progress.task(f"{label}: teacher-forced eval", total=(len(ids) - 1) // WINDOW) as adv:
        tf = teacher_forced(test, ref, ids, adv)
    with progress.task(f"{label}: greedy {config.decode_tokens} tokens"):
        gen = greedy_check(test, ref, prompts, config.decode_tokens)
    return {"reference": str(ref_art.path), "reference_key": ref_art.key, "logits": logits,
            "teacher_forced": tf, "greedy": gen}


def run(config: ValidateConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    artifact, own_ref, *rest = inputs
    found = assets.source_dir(artifact)  # the engine's own tokenizer, else its lineage's
    tokenizer = load_tokenizer(found[0] if found else own_ref.path)
    if tokenizer is None:
        raise UserError(f"{own_ref.path}: checkpoint has no tokenizer files", "copy the tokenizer into the checkpoint")
    ids = eval_ids(config, tokenizer)
    prompts = prompts_from(ids, config, tokenizer)
    with progress.task("open artifact session"):
        test = open_session(artifact)
    io_problems = test.io_check() if hasattr(test, "io_check") else []
    report: dict = {"artifact": str(artifact.path), "artifact_key": artifact.key, "backend": test.backend,
                    "artifact_bytes": artifact_bytes(artifact), "io": {"problems": io_problems}}
    report["conversion"] = section(test, own_ref, ids, prompts, config, progress, "conversion")
    if rest:
        report["quantization"] = section(test, rest[0], ids, prompts, config, progress, "quantization")
    with progress.task("latency"):
        report["latency"] = latency(test, ids[:128], max(config.decode_tokens, 16))
    gates, source = _gates(config, inputs)
    report["gates"] = {"source": source, "gated": config.gates != "none", **gates.model_dump()}
    report["checks"] = evaluate_gates(report, gates)
    report["passed"] = all(c["passed"] for c in report["checks"] if c["passed"] is not None)
    write_report(report, out)
    return {"passed": report["passed"], "checks": report["checks"], "gates": report["gates"],
            "summary": {k: report[k] for k in ("backend", "artifact_bytes")}}


def _gates(config: ValidateConfig, inputs: list[Artifact]):  # noqa: ANN202
    return effective_gates(config.gates, profile_of(lineage(inputs[0])))


STAGE = Stage(name="validate", kind="report", version=1, config_model=ValidateConfig, run=run,
              input_kinds=("engine", "onnx"), packages=("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt"),
              default_file=lambda config: presets.DEFAULT_EVAL_TEXT,
              key_extra=lambda config, inputs: _gates(config, inputs)[0].model_dump())


def load_report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())

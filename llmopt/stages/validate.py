"""validate: prove an artifact is faithful to the PyTorch model it came from, with numbers.

Memory: the references run first, one at a time, at their stored size (:mod:`llmopt.runtime.reference`);
what the checks need from them (a few logits, the teacher-forced logits in a memory-mapped scratch file,
greedy tokens) is kept and each model is freed before the next; the artifact opens last, alone.

Sections: ``conversion`` compares the artifact with its own checkpoint (for a quantized artifact,
the dequantized checkpoint), ``quantization`` compares it with the unquantized checkpoint. Each
runs the same checks through the same generation loop: logits error on a left-padded batch
(compared only where the mask is 1), teacher-forced top-1 / KL / perplexity, and greedy decoding
with the KV cache.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmopt.artifact import Artifact, lineage
from llmopt.errors import UserError
from llmopt.estimates import validate_estimate
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
from llmopt.runtime.reference import load_reference
from llmopt.runtime.torch_session import TorchSession
from llmopt.stages.base import Stage
from llmopt.validate_report import evaluate_gates, write_report

WINDOW = 256
WINDOW_BATCH = 4
PROMPT_LENGTHS = (7, 19, 32, 12)
LATENCY_PROMPT = 128


def context_limits(artifact: Artifact) -> tuple[int | None, int | None]:
    """(longest prefill, longest sequence = prompt + generated) the artifact can run; None = no fixed limit.

    An ONNX Runtime engine with GroupQueryAttention binds a KV buffer of ``kv_capacity`` positions
    (io.json); a TensorRT engine's profiles end at the envelope's input_len max (prefill) and total_len
    max. Validate keeps every shape it runs inside these limits: a small envelope shortens the
    teacher-forced windows and the latency prompt instead of failing after the references ran.
    """
    io_path = artifact.path / "io.json"
    if io_path.is_file():
        try:
            cap = json.loads(io_path.read_text()).get("kv_capacity")
        except (OSError, ValueError, AttributeError):
            cap = None  # open_session reports a broken io.json in its own words
        if isinstance(cap, int) and cap > 0:
            return cap, cap
    if artifact.kind == "engine" and artifact.metadata.get("backend") == "tensorrt":
        env = artifact.config.get("envelope") if isinstance(artifact.config, dict) else None
        if isinstance(env, dict) and env.get("total_len") and env.get("input_len"):
            return int(min(env["input_len"][2], env["total_len"][2])), int(env["total_len"][2])
    return None, None


def check_fits(limit: int | None, prompts: list[list[int]], decode_tokens: int, where: str,
               hint: str) -> None:
    """The padded prompts plus the greedy tokens fit the artifact's context (before any model runs)."""
    if limit is None:
        return
    need = max(len(p) for p in prompts) + max(decode_tokens, 16)
    if need > limit:
        raise UserError(f"{where}: validate needs {need} tokens per sequence (longest prompt "
                        f"{max(len(p) for p in prompts)} + {max(decode_tokens, 16)} generated), the engine holds "
                        f"{limit}", hint)


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


@dataclass
class Reference:
    """What one reference model produced, kept so that the model is gone before the artifact opens."""

    artifact: Artifact
    mask: np.ndarray
    prefill: np.ndarray           # [batch, seq, vocab] logits of the padded batch
    next_ids: np.ndarray          # its argmax at the last position, fed to both decodes
    decode: np.ndarray            # [batch, 1, vocab]
    windows: np.ndarray           # [n_windows, WINDOW, vocab] teacher-forced logits (memory-mapped file)
    greedy: np.ndarray            # [batch, decode_tokens]


def _windows(ids: list[int], window: int = WINDOW) -> list[np.ndarray]:
    n = (len(ids) - 1) // window
    return [np.array(ids[i * window:(i + 1) * window + 1], np.int64) for i in range(n)]


def reference_pass(ref_art: Artifact, ids: list[int], prompts: list[list[int]], config: ValidateConfig,
                   scratch: Path, progress: Progress, label: str, window: int = WINDOW) -> Reference:
    """Run the PyTorch reference alone (weights at their stored size) and free it before returning."""
    with progress.task(f"{label}: load the reference"):
        model = load_reference(ref_art.path)
    ref = TorchSession(model)
    with progress.task(f"{label}: reference logits, teacher-forced windows and greedy decode"):
        batch, mask = left_pad(prompts)
        prefill = ref.prefill(batch, mask)
        nxt = prefill[:, -1].argmax(-1)
        decode = ref.decode(nxt)
        windows = _windows(ids, window)
        store = np.lib.format.open_memmap(scratch / f"{label}.npy", mode="w+", dtype=np.float32,
                                          shape=(len(windows), window, ref.dims.vocab_size))
        for b in range(0, len(windows), WINDOW_BATCH):
            chunk = np.stack(windows[b:b + WINDOW_BATCH])
            store[b:b + len(chunk)] = ref.prefill(chunk[:, :-1])
        store.flush()
        tokens = greedy(ref, prompts, config.decode_tokens).tokens
    del ref, model
    gc.collect()
    return Reference(ref_art, mask, prefill, nxt, decode, store, tokens)


def logits_check(test: DecoderSession, ref: Reference, prompts: list[list[int]]) -> dict:
    ids, mask = left_pad(prompts)
    t_logits = test.prefill(ids, mask)
    shape_ok = t_logits.shape == (*ids.shape, test.dims.vocab_size)
    prefill = logits_error(ref.prefill, t_logits, mask)
    decode = logits_error(ref.decode, test.decode(ref.next_ids))
    return {"batch": len(prompts), "lengths": [len(p) for p in prompts], "shape_ok": bool(shape_ok),
            "logits_shape": list(t_logits.shape), "prefill": prefill, "decode": decode,
            "max_rel": max(prefill["max_rel"], decode["max_rel"])}


def teacher_forced(test: DecoderSession, refs: list[Reference], ids: list[int], advance,  # noqa: ANN001
                   window: int = WINDOW) -> list[dict]:
    """The artifact's logits on each window, compared with every reference's (read back from disk)."""
    windows = _windows(ids, window)
    parts: list[list[dict]] = [[] for _ in refs]
    for b in range(0, len(windows), WINDOW_BATCH):
        chunk = np.stack(windows[b:b + WINDOW_BATCH])
        x, y = chunk[:, :-1], chunk[:, 1:]
        t = test.prefill(x)
        for ref, out in zip(refs, parts):
            r = np.asarray(ref.windows[b:b + len(chunk)])
            out.append(token_arrays(r.reshape(-1, r.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1)))
        advance(len(chunk))
    return [summarize(p) for p in parts]


def greedy_check(test_tokens: np.ndarray, ref: Reference, n: int) -> dict:
    div = first_divergence(test_tokens, ref.greedy)
    prefix = [n if d is None else d for d in div]
    return {"new_tokens": n, "prompts": len(test_tokens), "first_divergence": div,
            "agreement": float(np.mean(prefix) / n), "token_match": float((test_tokens == ref.greedy).mean())}


def latency(test: DecoderSession, prompt: list[int], n: int) -> dict:
    greedy(test, [prompt[:8]], 4)  # warm-up
    g = greedy(test, [prompt], n)
    return {"prompt_tokens": len(prompt), "prefill_ms": g.prefill_s * 1e3, "decode_ms_median": g.decode_ms_median,
            "decode_ms_p90": g.decode_ms_p90, "tokens_per_s": 1e3 / g.decode_ms_median}


def run(config: ValidateConfig, inputs: list[Artifact], out: Path, progress: Progress) -> dict:
    """References first, one at a time, each freed before the next; then the artifact alone."""
    artifact, own_ref, *rest = inputs
    found = assets.source_dir(artifact)  # the engine's own tokenizer, else its lineage's
    tokenizer = load_tokenizer(found[0] if found else own_ref.path)
    if tokenizer is None:
        raise UserError(f"{own_ref.path}: checkpoint has no tokenizer files", "copy the tokenizer into the checkpoint")
    ids = eval_ids(config, tokenizer)
    prompts = prompts_from(ids, config, tokenizer)
    prefill_limit, limit = context_limits(artifact)
    check_fits(limit, prompts, config.decode_tokens, str(artifact.path),
               "lower --decode-tokens (or the prompts), or rebuild with a larger envelope total_len max "
               "(llmopt build --total-len MIN,OPT,MAX)")
    window = min(WINDOW, prefill_limit) if prefill_limit else WINDOW
    n_latency = max(config.decode_tokens, 16)
    latency_prompt = min(LATENCY_PROMPT, prefill_limit or LATENCY_PROMPT, (limit or LATENCY_PROMPT * 2) - n_latency)
    labels = ["conversion"] + (["quantization"] if rest else [])
    scratch = Path(tempfile.mkdtemp(prefix=".reference-", dir=out))
    try:
        refs = [reference_pass(art, ids, prompts, config, scratch, progress, label, window)
                for art, label in zip([own_ref, *rest[:1]], labels)]
        with progress.task("open artifact session"):
            test = open_session(artifact)
        io_problems = test.io_check() if hasattr(test, "io_check") else []
        report: dict = {"artifact": str(artifact.path), "artifact_key": artifact.key, "backend": test.backend,
                        "artifact_bytes": artifact_bytes(artifact), "io": {"problems": io_problems}}
        sections = {label: {"reference": str(r.artifact.path), "reference_key": r.artifact.key} for label, r in zip(labels, refs)}
        with progress.task("artifact: logits on a padded batch"):
            for label, r in zip(labels, refs):
                sections[label]["logits"] = logits_check(test, r, prompts)
        with progress.task("artifact: teacher-forced eval", total=len(_windows(ids, window))) as adv:
            for label, tf in zip(labels, teacher_forced(test, refs, ids, adv, window)):
                sections[label]["teacher_forced"] = {**tf, "window": window}
        with progress.task(f"artifact: greedy {config.decode_tokens} tokens"):
            tokens = greedy(test, prompts, config.decode_tokens).tokens
            for label, r in zip(labels, refs):
                sections[label]["greedy"] = greedy_check(tokens, r, config.decode_tokens)
        report.update(sections)
        with progress.task("latency"):
            report["latency"] = latency(test, ids[:latency_prompt], n_latency)
    finally:
        refs = []
        shutil.rmtree(scratch, ignore_errors=True)
    gates, source = _gates(config, inputs)
    report["gates"] = {"source": source, "gated": config.gates != "none", **gates.model_dump()}
    report["checks"] = evaluate_gates(report, gates)
    report["passed"] = all(c["passed"] for c in report["checks"] if c["passed"] is not None)
    write_report(report, out)
    return {"passed": report["passed"], "checks": report["checks"], "gates": report["gates"],
            "summary": {k: report[k] for k in ("backend", "artifact_bytes")}}


def _gates(config: ValidateConfig, inputs: list[Artifact]):  # noqa: ANN202
    return effective_gates(config.gates, profile_of(lineage(inputs[0])))


STAGE = Stage(name="validate", kind="report", version=2, config_model=ValidateConfig, run=run,
              input_kinds=("engine", "onnx"), packages=("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt"),
              default_file=lambda config: presets.DEFAULT_EVAL_TEXT, estimate=validate_estimate,
              key_extra=lambda config, inputs: _gates(config, inputs)[0].model_dump())


def load_report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())

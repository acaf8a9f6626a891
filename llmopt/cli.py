"""Command-line interface: parse → typed config → runner. Human output on stderr, --json on stdout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from llmopt import __version__
from llmopt.cli_values import gates as _gates, triple as _triple
from llmopt.errors import GateFailed, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a Hugging Face decoder-only LLM into a fast, validated inference artifact.")
STATE: dict[str, Any] = {"verbose": 0, "quiet": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rebuild even when the output is up to date.")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="Output artifact directory.")]


def console() -> Console:
    return Console(stderr=True, quiet=STATE["quiet"], soft_wrap=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _progress():  # noqa: ANN202
    from llmopt.progress import Progress

    return Progress(console())


def _log(msg: str) -> None:
    console().print(msg)


def emit(payload: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def _stage_result(run) -> dict:  # noqa: ANN001
    a = run.artifact
    return {"path": str(a.path), "stage": a.stage, "kind": a.kind, "key": a.key, "reused": run.reused,
            "metadata": a.metadata}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmopt {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More output.")] = 0,
          quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    STATE.update(verbose=verbose, quiet=quiet)


@app.command("load")
def load_cmd(source: Annotated[str, typer.Argument(help="Local HF checkpoint dir, .gguf file or preset:NAME.")],
             output: OutOpt,
             dtype: Annotated[str, typer.Option(help="auto (keep the source dtype) | float32 | float16 | bfloat16")] = "auto",
             max_shard_gb: Annotated[Optional[float], typer.Option(help="Write shards of at most this many GB.")] = None,
             force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Read a checkpoint, GGUF or preset tensor by tensor, check every tensor, write a checkpoint artifact."""
    from llmopt.recipe import LoadConfig, validated
    from llmopt.runner import run_stage
    from llmopt.stages import load

    from llmopt.preflight import check_source

    _quiet_libraries()
    if not source.startswith("preset:"):
        source = str(Path(source).resolve())
        check_source(Path(source))
    cfg = validated(LoadConfig, {"source": source, "dtype": dtype, "max_shard_gb": max_shard_gb}, "load")
    run = run_stage(load.STAGE, cfg, [], output, force=force, progress=_progress(), log=_log)
    emit(_stage_result(run), as_json)


@app.command("quantize")
def quantize_cmd(ckpt: Annotated[Path, typer.Argument(help="Checkpoint artifact directory.")], output: OutOpt,
                 method: Annotated[str, typer.Option(help="rtn | gptq | awq | smoothquant")] = "rtn",
                 bits: Annotated[int, typer.Option(help="4 or 8")] = 4,
                 group_size: Annotated[Optional[int], typer.Option(help="int4 group size (32/64/128/256); 0 = per channel")] = 128,
                 symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric")] = True,
                 calibration: Annotated[Optional[Path], typer.Option(help="Calibration text file.")] = None,
                 samples: Annotated[int, typer.Option(help="Calibration samples.")] = 64,
                 seq_len: Annotated[int, typer.Option(help="Tokens per calibration sample.")] = 256,
                 ignore: Annotated[Optional[list[str]], typer.Option(help="Module name pattern kept in float (repeatable).")] = None,
                 act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="GPTQ activation order (static: groups stay contiguous).")] = True,
                 alpha: Annotated[float, typer.Option(help="SmoothQuant migration strength.")] = 0.5,
                 error_stats: Annotated[bool, typer.Option(
                     help="RTN: measure per-linear output errors on calibration text (layer by layer, slower).")] = False,
                 force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Quantize weights (RTN, GPTQ, AWQ) or weights+activations (SmoothQuant W8A8)."""
    from llmopt.artifact import open_artifact
    from llmopt.recipe import QuantizeConfig, validated
    from llmopt.runner import run_stage
    from llmopt.stages import quantize

    _quiet_libraries()
    data: dict[str, Any] = {"method": method, "bits": bits, "group_size": group_size or None, "symmetric": symmetric,
                            "calibration": {"text": str(calibration.resolve()) if calibration else None,
                                            "samples": samples, "seq_len": seq_len},
                            "act_order": act_order, "alpha": alpha, "error_stats": error_stats}
    if ignore is not None:
        data["ignore"] = ignore
    cfg = validated(QuantizeConfig, data, "quantize")
    src = open_artifact(ckpt, ("checkpoint",))
    run = run_stage(quantize.STAGE, cfg, [src], output, force=force, progress=_progress(), log=_log)
    emit(_stage_result(run), as_json)


@app.command("export")
def export_cmd(ckpt: Annotated[Path, typer.Argument(help="Checkpoint artifact directory.")], output: OutOpt,
               opset: Annotated[int, typer.Option(help="ONNX opset (23: standard Attention/RotaryEmbedding/RMSNorm).")] = 23,
               dtype: Annotated[str, typer.Option(help="float32 | float16")] = "float32",
               force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Export ONNX with the KV cache as explicit inputs/outputs and dynamic axes."""
    from llmopt.artifact import open_artifact
    from llmopt.recipe import ExportConfig, validated
    from llmopt.runner import run_stage
    from llmopt.stages import export

    _quiet_libraries()
    cfg = validated(ExportConfig, {"opset": opset, "dtype": dtype}, "export")
    src = open_artifact(ckpt, ("checkpoint",))
    run = run_stage(export.STAGE, cfg, [src], output, force=force, progress=_progress(), log=_log)
    emit(_stage_result(run), as_json)


@app.command("build")
def build_cmd(onnx_dir: Annotated[Path, typer.Argument(metavar="ONNX", help="ONNX artifact directory.")], output: OutOpt,
              backend: Annotated[str, typer.Option(help="onnxruntime | tensorrt")] = "onnxruntime",
              device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
              threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (default: physical cores).")] = None,
              accuracy_level: Annotated[int, typer.Option(help="MatMulNBits accuracy level (4: int8 activations).")] = 4,
              attention: Annotated[str, typer.Option(help="ONNX Runtime attention: auto | gqa | standard.")] = "auto",
              quantize_lm_head: Annotated[str, typer.Option(help="ONNX Runtime lm_head: none | int8 | int4.")] = "none",
              kv_cache: Annotated[str, typer.Option(help="ONNX Runtime CPU KV cache: float | int8 (calibrated).")] = "float",
              kv_calibration: Annotated[Optional[Path], typer.Option(
                  help="Text whose K/V ranges set the int8 KV cache scales (default: shipped text).")] = None,
              workspace: Annotated[float, typer.Option(help="TensorRT workspace GiB.")] = 4.0,
              timing_cache: Annotated[Optional[Path], typer.Option(help="TensorRT timing cache file (shared).")] = None,
              hardware_compat: Annotated[str, typer.Option(help="none | ampere+ | same-compute-capability")] = "none",
              version_compatible: Annotated[bool, typer.Option(help="TensorRT version-compatible engine.")] = False,
              batch: Annotated[Optional[str], typer.Option(help="Envelope batch MIN,OPT,MAX.")] = None,
              input_len: Annotated[Optional[str], typer.Option(help="Envelope new tokens MIN,OPT,MAX.")] = None,
              total_len: Annotated[Optional[str], typer.Option(help="Envelope total length MIN,OPT,MAX.")] = None,
              force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Build an ONNX Runtime model or a TensorRT engine from an ONNX artifact."""
    from llmopt.artifact import open_artifact
    from llmopt.recipe import BuildConfig, validated
    from llmopt.runner import run_stage
    from llmopt.stages import build

    env = {k: v for k, v in (("batch", _triple(batch, "batch")), ("input_len", _triple(input_len, "input-len")),
                             ("total_len", _triple(total_len, "total-len"))) if v is not None}
    cfg = validated(BuildConfig, {"backend": backend, "device": device, "threads": threads,
                                  "accuracy_level": accuracy_level, "attention": attention,
                                  "quantize_lm_head": quantize_lm_head, "kv_cache": kv_cache,
                                  **({"kv_calibration": {"text": str(kv_calibration.resolve())}} if kv_calibration else {}),
                                  "workspace_gib": workspace,
                                  "timing_cache": str(timing_cache.resolve()) if timing_cache else None,
                                  "hardware_compat": hardware_compat, "version_compatible": version_compatible,
                                  "envelope": env}, "build")
    src = open_artifact(onnx_dir, ("onnx",))
    from llmopt.preflight import check_envelope_against_lineage

    check_envelope_against_lineage(cfg.envelope.total_len[2], src)
    run = run_stage(build.STAGE, cfg, [src], output, force=force, progress=_progress(), log=_log)
    emit(_stage_result(run), as_json)


@app.command("validate")
def validate_cmd(engine: Annotated[Path, typer.Argument(help="Engine (or ONNX) artifact directory.")],
                 output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Report directory (default: ENGINE.report).")] = None,
                 reference: Annotated[Optional[Path], typer.Option(help="Unquantized checkpoint to compare quality against.")] = None,
                 eval_text: Annotated[Optional[Path], typer.Option(help="Evaluation text (default: shipped eval text).")] = None,
                 decode_tokens: Annotated[int, typer.Option(help="Greedy tokens per prompt.")] = 32,
                 eval_tokens: Annotated[int, typer.Option(help="Teacher-forced tokens.")] = 2048,
                 gate: Annotated[Optional[list[str]], typer.Option(
                     help="NAME=VALUE gate (repeatable) over the artifact's default gates, e.g. min_top1_agreement=0.98; "
                          "'none' = --no-gates.")] = None,
                 no_gates: Annotated[bool, typer.Option("--no-gates", help="Report numbers only, gate nothing (UNGATED).")] = False,
                 force: ForceOpt = False, as_json: JsonOpt = False) -> None:
    """Compare an artifact with its PyTorch checkpoint: logits, top-1, KL, perplexity, greedy decoding."""
    from llmopt.artifact import open_artifact
    from llmopt.recipe import ValidateConfig, validated
    from llmopt.runner import run_stage, validation_inputs
    from llmopt.stages import validate

    _quiet_libraries()
    cfg = validated(ValidateConfig, {"eval_text": str(eval_text.resolve()) if eval_text else None,
                                     "decode_tokens": decode_tokens, "eval_tokens": eval_tokens,
                                     "gates": _gates(gate, no_gates)}, "validate")
    art = open_artifact(engine, ("engine", "onnx"))
    ref = open_artifact(reference, ("checkpoint",)) if reference else None
    out = output or art.path.parent / f"{art.path.name}.report"
    run = run_stage(validate.STAGE, cfg, validation_inputs(art, ref), out, force=force, progress=_progress(), log=_log)
    _finish_validation(run.artifact, as_json, {"report": _stage_result(run)})


def _finish_validation(report_art, as_json: bool, payload: dict) -> None:  # noqa: ANN001
    from llmopt.validate_report import check_line, failures, verdict

    md = report_art.metadata
    c = console()
    if md.get("gates"):
        c.print(f"gates: {md['gates']['source']}", markup=False, highlight=False)
    for check in md["checks"]:
        c.print(check_line(check), markup=False, highlight=False)
    c.print(f"[bold]{verdict(md)}[/] — report: {report_art.path / 'report.md'}")
    emit(payload | {"passed": md["passed"], "gated": md.get("gates", {}).get("gated", True)}, as_json)
    if not md["passed"]:
        raise GateFailed(failures(md["checks"]))


@app.command("convert")
def convert_cmd(recipe: Annotated[Path, typer.Argument(help="Recipe YAML.")],
                workdir: Annotated[Optional[Path], typer.Option("-w", "--workdir", help="Work directory (default: work/NAME).")] = None,
                from_stage: Annotated[Optional[str], typer.Option("--from", help="Rebuild from this stage on.")] = None,
                force: ForceOpt = False,
                overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a field, e.g. quantize.bits=8.")] = None,
                as_json: JsonOpt = False) -> None:
    """Run load → quantize → export → build → validate from a recipe, reusing up-to-date stages."""
    from llmopt.artifact import open_artifact
    from llmopt.convert import DIRS, convert
    from llmopt.recipe import load_recipe

    _quiet_libraries()
    r = load_recipe(recipe, overrides or [])
    wd = (workdir or Path("work") / r.name).resolve()
    try:
        result = convert(r, wd, from_stage=from_stage, force=force, progress=_progress(), log=_log)
    except GateFailed as exc:
        emit(exc.report or {}, as_json)
        _finish_validation(open_artifact(wd / DIRS["validate"]), False, {})
        raise
    if "validation" in result:
        _finish_validation(open_artifact(wd / DIRS["validate"]), False, {})
    emit(result, as_json)


@app.command("generate")
def generate_cmd(engine: Annotated[Path, typer.Argument(help="Engine, ONNX or checkpoint artifact.")],
                 prompt: Annotated[list[str], typer.Option(help="Prompt text (repeatable: a batch).")],
                 chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template to the prompt.")] = False,
                 system: Annotated[Optional[str], typer.Option(help="System message (with --chat).")] = None,
                 max_new_tokens: Annotated[int, typer.Option(help="At most this many new tokens.")] = 256,
                 stop: Annotated[Optional[list[str]], typer.Option(help="Stop before this text (repeatable).")] = None,
                 temperature: Annotated[Optional[float], typer.Option(help="0 = greedy (default: the model's generation config).")] = None,
                 top_k: Annotated[Optional[int], typer.Option(help="Sample from the k most likely tokens (0 = all).")] = None,
                 top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass (1 = all).")] = None,
                 repetition_penalty: Annotated[Optional[float], typer.Option(help=">1 discourages repeated tokens.")] = None,
                 seed: Annotated[Optional[int], typer.Option(help="Random seed: same seed, same text.")] = None,
                 threads: Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads.")] = None,
                 as_json: JsonOpt = False) -> None:
    """Generate text through the artifact and its KV cache; stops at the model's eos ids and --stop strings."""
    from llmopt.generate_cmd import GenerateRequest, default_stream, run_generate

    _quiet_libraries()
    if any(not p.strip() for p in prompt):
        raise UserError("--prompt is empty", "give the text the model should continue, e.g. --prompt 'The file'")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    req = GenerateRequest(prompts=list(prompt), max_new_tokens=max_new_tokens, chat=chat, system=system,
                          stop=tuple(stop or ()), temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed, threads=threads)
    result = run_generate(engine, req, stream=default_stream(as_json, STATE["quiet"]), log=_log)
    t = result["timings"]
    console().print(f"[dim]{result['finish_reason']} · {t['generated_tokens']} tokens · first token "
                    f"{t['time_to_first_token_ms']:.0f} ms · {t['decode_tokens_per_s'] or 0:.1f} tokens/s[/]", highlight=False)
    emit(result, as_json)


@app.command("bench")
def bench_cmd(engine: Annotated[Path, typer.Argument(help="Engine, ONNX or checkpoint artifact.")],
              baseline: Annotated[Optional[list[str]], typer.Option(help="torch | torch-compile (repeatable; default both).")] = None,
              no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Time the artifact alone.")] = False,
              prompt_len: Annotated[int, typer.Option(min=1, help="Prompt tokens.")] = 128,
              new_tokens: Annotated[int, typer.Option(min=4, help="Tokens generated per timed run.")] = 64,
              threads: Annotated[Optional[int], typer.Option(min=1, help="Threads for every system (default: physical cores).")] = None,
              repeat: Annotated[int, typer.Option(min=1, help="Rounds; systems take turns within each.")] = 3,
              contexts: Annotated[str, typer.Option(help="Context lengths for decode scaling, comma-separated ('' skips).")] = "128,512,1024",
              profile: Annotated[bool, typer.Option(help="Per-op decode profile of an ONNX Runtime artifact.")] = False,
              as_json: JsonOpt = False) -> None:
    """Time the artifact against the PyTorch model it came from (eager, torch.compile) in one run."""
    from llmopt.bench import BASELINES, BenchConfig, bench, render

    _quiet_libraries()
    try:
        ctx = tuple(int(c) for c in contexts.split(",") if c.strip())
    except ValueError:
        raise UserError(f"--contexts {contexts!r}: expected comma-separated integers", "e.g. --contexts 128,512,1024") from None
    cfg = BenchConfig(prompt_len=prompt_len, new_tokens=new_tokens, threads=threads, repeat=repeat, contexts=ctx,
                      profile=profile)
    baselines = [] if no_baseline else list(baseline or BASELINES)
    c = console()
    report = bench(engine, baselines, cfg, log=lambda m: None if STATE["quiet"] else c.print(f"… {m}", highlight=False),
                   baselines_required=baseline is not None)
    render(report, c)
    emit(report, as_json)


@app.command("serve")
def serve_cmd(engine: Annotated[Path, typer.Argument(help="Engine (or ONNX / checkpoint) artifact directory.")],
              host: Annotated[str, typer.Option(help="Address to listen on (loopback unless told otherwise).")] = "127.0.0.1",
              port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port, reported when ready).")] = 8000,
              max_batch: Annotated[Optional[int], typer.Option(min=1, help="Sequences decoded together (default: the envelope's batch max).")] = None,
              max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting for a slot before 429.")] = 64,
              api_key: Annotated[Optional[str], typer.Option(envvar="LLMOPT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.")] = None,
              model_name: Annotated[Optional[str], typer.Option(help="Model id in the API (default: the engine directory name).")] = None,
              prefill_chunk: Annotated[int, typer.Option(min=16, help="Prompt tokens prefilled per scheduler step.")] = 256,
              threads: Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads (default: physical cores).")] = None,
              drain_timeout: Annotated[float, typer.Option(min=0, help="Seconds SIGTERM waits for in-flight requests.")] = 60.0,
              as_json: JsonOpt = False) -> None:
    """OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching."""
    try:
        from llmopt.serve.server import bind, ready_event, serve
    except ImportError as exc:
        raise UserError(f"serving needs {exc.name}", "pip install 'llmopt[serve]'") from None
    from llmopt.serve.engine import open_engine

    _quiet_libraries()
    sock = bind(host, port)
    eng = open_engine(engine, max_batch=max_batch, threads=threads, chunk=prefill_chunk, name=model_name)
    ready = ready_event(eng, sock, api_key)

    def on_ready() -> None:
        _log(f"serving [bold]{eng.name}[/] at {ready['url']}/v1 ({eng.batching} batching, max batch "
             f"{ready['max_batch']}, {eng.capacity} tokens per sequence)")
        if as_json:  # one line, so a supervisor can read it as soon as the port accepts connections
            sys.stdout.write(json.dumps(ready) + "\n")
            sys.stdout.flush()

    serve(eng, sock, api_key=api_key, max_queue=max_queue, drain_timeout=drain_timeout, verbose=STATE["verbose"] > 0,
          on_ready=on_ready, on_drain=lambda: _log("draining: finishing in-flight requests"))
    _log("stopped")


@app.command("inspect")
def inspect_cmd(directory: Annotated[Path, typer.Argument(help="Artifact directory.")], as_json: JsonOpt = False) -> None:
    """Show an artifact's manifest, lineage and I/O."""
    from llmopt.inspect import describe, render

    info = describe(directory)
    render(info, console())
    emit(info, as_json)


@app.command("verify")
def verify_cmd(directory: Annotated[Path, typer.Argument(help="Artifact directory.")], as_json: JsonOpt = False) -> None:
    """Check an artifact and its whole lineage file by file (size and sha256) against their manifests."""
    from llmopt.verify import render, verify

    info = verify(directory)
    render(info, console())
    emit(info, as_json)
    if not info["ok"]:
        bad = next(e for e in info["artifacts"] if e["status"] == "mismatch")
        raise UserError(f"{bad['problems'][0]} — does not match its manifest",
                        "rerun the stage that wrote it (llmopt convert rebuilds it)")


@app.command("doctor")
def doctor_cmd(as_json: JsonOpt = False) -> None:
    """Versions, ONNX Runtime providers that actually load, TensorRT and GPU status."""
    from llmopt.doctor import diagnose, render

    info = diagnose()
    render(info, console())
    emit(info, as_json)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see llmopt.entry)."""
    from llmopt.entry import run

    return run(app, argv)


if __name__ == "__main__":
    sys.exit(main())

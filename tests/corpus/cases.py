"""The fault corpus: each case builds a bad input (or a fault) under ``ctx.tmp`` and returns the CLI
arguments that must fail cleanly. ``test_corpus.py`` runs them all and checks the outcome.

A case returns ``(argv, codes)``: the exit codes allowed (1 user error, 2 gate failed).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tests.corpus.faults import copy_artifact, edit_json, flip_middle, hf_dir, remake_manifest, truncate, write_safetensors


@dataclass
class Ctx:
    tmp: Path
    ckpt_artifact: Path
    onnx_artifact: Path

    def hf(self) -> Path:
        return hf_dir(self.ckpt_artifact, self.tmp / "hf")

    def ckpt(self) -> Path:
        return copy_artifact(self.ckpt_artifact, self.tmp / "ckpt")

    def onnx(self) -> Path:
        return copy_artifact(self.onnx_artifact, self.tmp / "onnx")

    def out(self) -> str:
        return str(self.tmp / "out")

    def recipe(self, text: str | bytes, name: str = "r.yaml") -> Path:
        p = self.tmp / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p


CASES: dict[str, Callable[[Ctx], tuple[list, set]]] = {}
OK_RECIPE = "name: c\nmodel: {source: 'preset:tiny-llama'}\n"


def case(name: str):  # noqa: ANN201
    def register(fn):  # noqa: ANN001, ANN202
        CASES[name] = fn
        return fn
    return register


def _load(ctx: Ctx, src: Path) -> tuple[list, set]:
    return ["load", src, "-o", ctx.out()], {1}


# --- checkpoint directories (load SOURCE) -------------------------------------------------------

@case("hf/config not json")
def _(ctx):
    d = ctx.hf(); (d / "config.json").write_text("{oops")
    return _load(ctx, d)


@case("hf/config is a list")
def _(ctx):
    d = ctx.hf(); (d / "config.json").write_text("[1, 2]")
    return _load(ctx, d)


@case("hf/config string where int belongs")
def _(ctx):
    d = ctx.hf(); edit_json(d / "config.json", lambda c: c.update(hidden_size="big"))
    return _load(ctx, d)


@case("hf/config zero heads")
def _(ctx):
    d = ctx.hf(); edit_json(d / "config.json", lambda c: c.update(num_attention_heads=0))
    return _load(ctx, d)


@case("hf/config negative layers")
def _(ctx):
    d = ctx.hf(); edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=-1))
    return _load(ctx, d)


@case("hf/config unknown model_type")
def _(ctx):
    d = ctx.hf(); edit_json(d / "config.json", lambda c: c.update(model_type="mamba9"))
    return _load(ctx, d)


@case("hf/config not utf-8")
def _(ctx):
    d = ctx.hf(); (d / "config.json").write_bytes(b'{"model_type": "ll\xffama"}')
    return _load(ctx, d)


@case("hf/config missing")
def _(ctx):
    d = ctx.hf(); (d / "config.json").unlink()
    return _load(ctx, d)


@case("hf/config is a directory")
def _(ctx):
    d = ctx.hf(); (d / "config.json").unlink(); (d / "config.json").mkdir()
    return _load(ctx, d)


@case("hf/no weights")
def _(ctx):
    d = ctx.hf(); (d / "model.safetensors").unlink()
    return _load(ctx, d)


@case("hf/safetensors garbage")
def _(ctx):
    d = ctx.hf(); (d / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    return _load(ctx, d)


@case("hf/safetensors empty")
def _(ctx):
    d = ctx.hf(); (d / "model.safetensors").write_bytes(b"")
    return _load(ctx, d)


@case("hf/safetensors truncated")
def _(ctx):
    d = ctx.hf(); truncate(d / "model.safetensors", 0.6)
    return _load(ctx, d)


@case("hf/safetensors header lies about size")
def _(ctx):
    d = ctx.hf()
    data = bytearray((d / "model.safetensors").read_bytes())
    data[:8] = (10 ** 12).to_bytes(8, "little")
    (d / "model.safetensors").write_bytes(bytes(data))
    return _load(ctx, d)


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@case("hf/int32 tensor where a float weight belongs")
def _(ctx):
    d = ctx.hf(); t = _tensors(d)
    t["model.norm.weight"] = torch.ones_like(t["model.norm.weight"], dtype=torch.int32)
    write_safetensors(d / "model.safetensors", t)
    return _load(ctx, d)


@case("hf/nan in a weight")
def _(ctx):
    d = ctx.hf(); t = _tensors(d)
    t["model.norm.weight"][0] = float("nan")
    write_safetensors(d / "model.safetensors", t)
    return _load(ctx, d)


@case("hf/tensor of the wrong shape")
def _(ctx):
    d = ctx.hf(); t = _tensors(d)
    t["model.norm.weight"] = torch.ones(3)
    write_safetensors(d / "model.safetensors", t)
    return _load(ctx, d)


@case("hf/missing tensor")
def _(ctx):
    d = ctx.hf(); t = _tensors(d)
    del t["model.norm.weight"]
    write_safetensors(d / "model.safetensors", t)
    return _load(ctx, d)


def _sharded(ctx: Ctx, shard_name: str) -> Path:
    d = ctx.hf()
    t = _tensors(d)
    (d / "model.safetensors").unlink()
    write_safetensors(d / "part1.safetensors", t)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard_name for k in t}}))
    return d


@case("hf/shard index escapes with ..")
def _(ctx):
    d = _sharded(ctx, "../elsewhere.safetensors")
    (d / "part1.safetensors").rename(ctx.tmp / "elsewhere.safetensors")
    return _load(ctx, d)


@case("hf/shard index absolute path")
def _(ctx):
    d = _sharded(ctx, str(ctx.tmp / "abs.safetensors"))
    (d / "part1.safetensors").rename(ctx.tmp / "abs.safetensors")
    return _load(ctx, d)


@case("hf/shard index not json")
def _(ctx):
    d = _sharded(ctx, "part1.safetensors"); (d / "model.safetensors.index.json").write_text("{")
    return _load(ctx, d)


@case("hf/shard index weight_map not a mapping")
def _(ctx):
    d = _sharded(ctx, "part1.safetensors"); (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    return _load(ctx, d)


@case("hf/shard index names a missing shard")
def _(ctx):
    d = _sharded(ctx, "part9.safetensors")
    return _load(ctx, d)


@case("hf/pickle weights only")
def _(ctx):
    d = ctx.hf(); (d / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (exec, ("open('/tmp/llmopt-corpus-pwned', 'w').write('x')",))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    return _load(ctx, d)


@case("hf/tokenizer.json corrupt")
def _(ctx):
    d = ctx.hf(); (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}')
    return _load(ctx, d)


@case("hf/tokenizer.json empty")
def _(ctx):
    d = ctx.hf(); (d / "tokenizer.json").write_text("")
    return _load(ctx, d)


@case("hf/tokenizer needs remote code")
def _(ctx):
    d = ctx.hf()
    edit_json(d / "tokenizer_config.json", lambda c: c.update(tokenizer_class="EvilTokenizer",
                                                                auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}))
    (d / "evil.py").write_text("open('/tmp/llmopt-corpus-pwned', 'w').write('x')\n")
    (d / "tokenizer.json").unlink()
    return _load(ctx, d)


@case("hf/source is a file")
def _(ctx):
    f = ctx.tmp / "model.safetensors"; f.write_bytes(b"x")
    return _load(ctx, f)


@case("hf/source missing")
def _(ctx):
    return _load(ctx, ctx.tmp / "nope")


@case("load/unknown preset")
def _(ctx):
    return ["load", "preset:gpt-17", "-o", ctx.out()], {1}


# --- artifacts read as inputs ------------------------------------------------------------------

@case("artifact/same-size corruption of ONNX data: build")
def _(ctx):
    o = ctx.onnx(); flip_middle(o / "model.onnx.data")
    return ["build", o, "-o", ctx.out()], {1}


@case("artifact/same-size corruption of ONNX data: bench")
def _(ctx):
    o = ctx.onnx(); flip_middle(o / "model.onnx.data")
    return ["bench", o, "--no-baseline", "--repeat", "1", "--new-tokens", "4", "--prompt-len", "4", "--contexts", ""], {1}


@case("artifact/same-size corruption of checkpoint weights: export")
def _(ctx):
    c = ctx.ckpt(); flip_middle(c / "model.safetensors")
    return ["export", c, "-o", ctx.out()], {1}


@case("artifact/same-size corruption of a tokenizer: quantize")
def _(ctx):
    c = ctx.ckpt(); flip_middle(c / "tokenizer.json", 8)
    return ["quantize", c, "-o", ctx.out()], {1}


@case("artifact/planted extra file")
def _(ctx):
    o = ctx.onnx(); (o / "extra.onnx").write_bytes(b"x")
    return ["generate", o, "--prompt", "a"], {1}


@case("artifact/ONNX protobuf corrupt, manifest re-made: build")
def _(ctx):
    o = ctx.onnx(); (o / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\xffnot a protobuf"); remake_manifest(o)
    return ["build", o, "-o", ctx.out()], {1}


@case("artifact/ONNX truncated, manifest re-made: generate")
def _(ctx):
    o = ctx.onnx(); truncate(o / "model.onnx", 0.5); remake_manifest(o)
    return ["generate", o, "--prompt", "a"], {1}


@case("artifact/ONNX data truncated, manifest re-made: validate")
def _(ctx):
    o = ctx.onnx(); truncate(o / "model.onnx.data", 0.5); remake_manifest(o)
    return ["validate", o, "-o", ctx.out(), "--eval-tokens", "256", "--decode-tokens", "2"], {1}


@case("artifact/io.json missing, manifest re-made: generate")
def _(ctx):
    o = ctx.onnx(); (o / "io.json").unlink(); remake_manifest(o)
    return ["generate", o, "--prompt", "a"], {1}


@case("artifact/io.json not json, manifest re-made: build")
def _(ctx):
    o = ctx.onnx(); (o / "io.json").write_text("{"); remake_manifest(o)
    return ["build", o, "-o", ctx.out()], {1}


@case("artifact/io.json wrong shape, manifest re-made: inspect")
def _(ctx):
    o = ctx.onnx(); (o / "io.json").write_text("[]"); remake_manifest(o)
    return ["inspect", o], {1}


@case("artifact/checkpoint safetensors garbage, manifest re-made: export")
def _(ctx):
    c = ctx.ckpt(); (c / "model.safetensors").write_bytes(b"\x08" * 4096); remake_manifest(c)
    return ["export", c, "-o", ctx.out()], {1}


@case("artifact/checkpoint config.json a list, manifest re-made: export")
def _(ctx):
    c = ctx.ckpt(); (c / "config.json").write_text("[]"); remake_manifest(c)
    return ["export", c, "-o", ctx.out()], {1}


@case("artifact/manifest not json")
def _(ctx):
    o = ctx.onnx(); (o / "manifest.json").write_text("{")
    return ["build", o, "-o", ctx.out()], {1}


@case("artifact/manifest is a list")
def _(ctx):
    o = ctx.onnx(); (o / "manifest.json").write_text("[]")
    return ["inspect", o], {1}


@case("artifact/manifest file table escapes")
def _(ctx):
    o = ctx.onnx()
    edit_json(o / "manifest.json", lambda m: m["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": "0"}}))
    return ["verify", o], {1}


@case("artifact/manifest fields of the wrong type")
def _(ctx):
    o = ctx.onnx()
    edit_json(o / "manifest.json", lambda m: m.update(files={"model.onnx": "big"}))
    return ["generate", o, "--prompt", "a"], {1}


@case("artifact/wrong kind")
def _(ctx):
    return ["build", ctx.ckpt(), "-o", ctx.out()], {1}


@case("artifact/directory without manifest")
def _(ctx):
    return ["export", ctx.hf(), "-o", ctx.out()], {1}


# --- outputs ---------------------------------------------------------------------------------

@case("out/is a file")
def _(ctx):
    f = ctx.tmp / "out"; f.write_text("mine")
    return ["export", ctx.ckpt(), "-o", f], {1}


@case("out/foreign directory with --force")
def _(ctx):
    d = ctx.tmp / "out"; d.mkdir(); (d / "mine.txt").write_text("mine")
    return ["load", "preset:tiny-llama", "-o", d, "--force"], {1}


@case("out/quantize onto its input")
def _(ctx):
    c = ctx.ckpt()
    return ["quantize", c, "-o", c], {1}


@case("out/validate onto its input")
def _(ctx):
    o = ctx.onnx()
    return ["validate", o, "-o", o], {1}


@case("out/inside the input")
def _(ctx):
    c = ctx.ckpt()
    return ["export", c, "-o", c / "onnx"], {1}


@case("out/parent is a file")
def _(ctx):
    f = ctx.tmp / "f"; f.write_text("x")
    return ["export", ctx.ckpt(), "-o", f / "out"], {1}


# --- recipes ---------------------------------------------------------------------------------

def _convert(ctx: Ctx, recipe: Path, *extra: str) -> tuple[list, set]:
    return ["convert", recipe, "-w", ctx.tmp / "w", *extra], {1}


@case("recipe/not utf-8")
def _(ctx):
    return _convert(ctx, ctx.recipe(b"name: \xff\xfe\nmodel: {source: x}\n"))


@case("recipe/is a directory")
def _(ctx):
    d = ctx.tmp / "r.yaml"; d.mkdir()
    return _convert(ctx, d)


@case("recipe/nested too deep")
def _(ctx):
    return _convert(ctx, ctx.recipe("name: c\nmodel: {source: 'preset:tiny-llama'}\nx: " + "[" * 5000 + "]" * 5000 + "\n"))


@case("recipe/nested deep in a mapping")
def _(ctx):
    return _convert(ctx, ctx.recipe("a:" + "".join(f"\n{'  ' * i}b:" for i in range(1, 40)) + " 1\n"))


@case("recipe/alias bomb")
def _(ctx):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return _convert(ctx, ctx.recipe("\n".join(lines) + "\nname: c\nmodel: {source: 'preset:tiny-llama'}\n"))


@case("recipe/yaml syntax error")
def _(ctx):
    return _convert(ctx, ctx.recipe("name: c\nmodel: {source: [\n"))


@case("recipe/empty")
def _(ctx):
    return _convert(ctx, ctx.recipe(""))


@case("recipe/a list")
def _(ctx):
    return _convert(ctx, ctx.recipe("- load\n- export\n"))


@case("recipe/too large")
def _(ctx):
    return _convert(ctx, ctx.recipe(OK_RECIPE + "# " + "x" * (2 << 20) + "\n"))


@case("recipe/unknown field")
def _(ctx):
    return _convert(ctx, ctx.recipe(OK_RECIPE + "export: {opsett: 23}\n"))


@case("recipe/missing")
def _(ctx):
    return _convert(ctx, ctx.tmp / "nope.yaml")


@case("recipe/name escapes")
def _(ctx):
    return ["convert", ctx.recipe("name: ../../evil\nmodel: {source: 'preset:tiny-llama'}\n")], {1}


@case("recipe/absolute name")
def _(ctx):
    return ["convert", ctx.recipe(f"name: {ctx.tmp}/abs\nmodel: {{source: 'preset:tiny-llama'}}\n")], {1}


@case("recipe/missing eval text")
def _(ctx):
    return _convert(ctx, ctx.recipe(OK_RECIPE + "validate: {eval_text: nope.txt}\n"))


@case("recipe/eval text is a directory")
def _(ctx):
    (ctx.tmp / "evaldir").mkdir()
    return _convert(ctx, ctx.recipe(OK_RECIPE + "validate: {eval_text: evaldir}\n"))


@case("recipe/missing calibration text")
def _(ctx):
    return _convert(ctx, ctx.recipe(OK_RECIPE + "quantize: {method: gptq, calibration: {text: nope.txt}}\n"))


@case("recipe/tensorrt without tensorrt")
def _(ctx):
    return _convert(ctx, ctx.recipe(OK_RECIPE + "build: {backend: tensorrt, device: cuda}\n"))


@case("recipe/envelope beyond max positions")
def _(ctx):
    return _convert(ctx, ctx.recipe(OK_RECIPE + "envelope: {batch: [1,1,1], input_len: [1,8,16], total_len: [1,64,99999]}\n"))


@case("recipe/source missing")
def _(ctx):
    return _convert(ctx, ctx.recipe("name: c\nmodel: {source: nope}\n"))


@case("recipe/source config not json")
def _(ctx):
    d = ctx.hf(); (d / "config.json").write_text("{")
    return _convert(ctx, ctx.recipe(f"name: c\nmodel: {{source: '{d}'}}\n"))


@case("recipe/bad --set")
def _(ctx):
    return _convert(ctx, ctx.recipe(OK_RECIPE), "--set", "name.x=1")


@case("recipe/--set bad yaml")
def _(ctx):
    return _convert(ctx, ctx.recipe(OK_RECIPE), "--set", "export.opset=[")


@case("recipe/--from unknown stage")
def _(ctx):
    return _convert(ctx, ctx.recipe(OK_RECIPE), "--from", "quantize")


@case("recipe/workdir foreign")
def _(ctx):
    w = ctx.tmp / "w"; w.mkdir(); (w / "recipe.resolved.yaml").write_text("mine")
    return _convert(ctx, ctx.recipe(OK_RECIPE))


@case("recipe/workdir is a file")
def _(ctx):
    (ctx.tmp / "w").write_text("mine")
    return _convert(ctx, ctx.recipe(OK_RECIPE))


# --- command options -------------------------------------------------------------------------

@case("cli/empty prompt")
def _(ctx):
    return ["generate", ctx.onnx(), "--prompt", ""], {1}


@case("cli/zero new tokens")
def _(ctx):
    return ["generate", ctx.onnx(), "--prompt", "a", "--max-new-tokens", "0"], {1}


@case("cli/unknown option")
def _(ctx):
    return ["export", ctx.ckpt(), "-o", ctx.out(), "--opsett", "3"], {1}


@case("cli/gate not a number")
def _(ctx):
    return ["validate", ctx.onnx(), "--gate", "max_kl=abc"], {1}


@case("cli/unknown gate")
def _(ctx):
    return ["validate", ctx.onnx(), "--gate", "max_vibes=1"], {1}


@case("cli/eval text missing")
def _(ctx):
    return ["validate", ctx.onnx(), "-o", ctx.out(), "--eval-text", ctx.tmp / "nope.txt"], {1}


@case("cli/eval text not utf-8")
def _(ctx):
    (ctx.tmp / "e.txt").write_bytes(b"\xff\xfe" * 10)
    return ["validate", ctx.onnx(), "-o", ctx.out(), "--eval-text", ctx.tmp / "e.txt"], {1}


@case("cli/impossible gate fails with exit 2")
def _(ctx):
    return ["validate", ctx.onnx(), "-o", ctx.out(), "--eval-tokens", "256", "--decode-tokens", "2",
            "--gate", "max_logits_rel_error=1e-15"], {2}


@case("cli/build envelope beyond max positions")
def _(ctx):
    return ["build", ctx.onnx(), "-o", ctx.out(), "--total-len", "1,64,99999", "--input-len", "1,8,16"], {1}

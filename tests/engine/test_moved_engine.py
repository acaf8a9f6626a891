"""A built engine directory is self-contained: copied alone elsewhere, with the checkpoint and ONNX
artifacts it came from out of reach, every command still runs it and gives the same tokens."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def out_of_reach(*paths: Path):
    """Rename artifact directories away (and back afterwards): the lineage cannot be followed."""
    moved = [(p, p.with_name(p.name + ".away")) for p in paths]
    for p, away in moved:
        p.rename(away)
    try:
        yield
    finally:
        for p, away in moved:
            away.rename(p)


def test_engine_carries_its_assets(fp32_engine, chat_ckpt):
    names = {p.name for p in fp32_engine.iterdir()}
    assert {"model.onnx", "io.json", "session.json", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= names
    manifest = json.loads((fp32_engine / "manifest.json").read_text())
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json", "genai_config.json"} <= set(manifest["files"])
    eos = json.loads((chat_ckpt / "generation_config.json").read_text())["eos_token_id"]
    assert isinstance(eos, list) and len(eos) == 2
    meta = manifest["metadata"]["assets"]
    assert meta["tokenizer"] and meta["chat_template"] and meta["eos_ids"] == eos  # every eos id, not the first
    assert meta["from"] == str(chat_ckpt)  # the lineage is still recorded
    assert manifest["inputs"][0]["kind"] == "onnx"
    assert json.loads((fp32_engine / "genai_config.json").read_text())["model"]["eos_token_id"] == eos


def test_moved_engine_runs_every_command(cli, fp32_engine, chat_ckpt, chat_onnx, tmp_path):
    raw = ["--prompt", "The file is opened", "--max-new-tokens", "24", "--temperature", "0", "--json"]
    chat = ["--prompt", "What is a file?", "--chat", "--system", "Be brief.", "--max-new-tokens", "16",
            "--temperature", "0.7", "--seed", "5", "--json"]
    where_built = [cli("generate", fp32_engine, *a).json()["token_ids"] for a in (raw, chat)]
    ref = tmp_path / "ref"
    assert cli("-q", "load", "preset:tiny-trained", "-o", ref).code == 0
    moved = tmp_path / "elsewhere" / "engine"
    shutil.copytree(fp32_engine, moved)
    with out_of_reach(chat_ckpt, chat_onnx):
        r = cli("generate", moved, *raw)
        assert r.code == 0, r.err
        out = r.json()
        assert out["assets"]["inside_engine"] is True and out["text"]
        c = cli("generate", moved, *chat)
        assert c.code == 0, c.err
        assert [out["token_ids"], c.json()["token_ids"]] == where_built

        info = cli("inspect", moved, "--json")
        assert info.code == 0, info.err
        assert [a["stage"] for a in info.json()["lineage"]] == ["build"]  # its inputs are out of reach
        b = cli("bench", moved, "--prompt-len", "16", "--new-tokens", "8", "--repeat", "1", "--contexts", "", "--json")
        assert b.code == 0, b.err
        assert [s["ok"] for s in b.json()["systems"]] == [True] and "baselines skipped" in b.err
        no_ref = cli("validate", moved, "-o", tmp_path / "r0")
        assert no_ref.code == 1 and "--reference" in no_ref.err
        v = cli("validate", moved, "--reference", ref, "-o", tmp_path / "report", "--eval-tokens", "256",
                "--decode-tokens", "8", "--json")
        assert v.code == 0, v.err
        assert v.json()["passed"] is True

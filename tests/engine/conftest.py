"""A trained chain for the engine tests: tiny-trained with a chat template and two eos ids, exported,
and built as fp32, int4 and int8-KV-cache ONNX Runtime engines (small envelope)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmopt.artifact import open_artifact
from llmopt.models import presets
from llmopt.recipe import BuildConfig, Envelope, ExportConfig, LoadConfig, QuantizeConfig
from llmopt.runner import run_stage
from llmopt.stages import build, export, load, quantize

# plain-text roles: the tiny tokenizer has no ChatML tokens, and apply_chat_template runs the same way
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
EOS_IDS = [0, 1]  # <|endoftext|> and a second id, as chat models list end-of-turn besides end-of-text
ENVELOPE = Envelope(input_len=(1, 64, 128), total_len=(1, 128, 256))


@pytest.fixture(scope="session")
def chain_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chain")


@pytest.fixture(scope="session")
def chat_ckpt(chain_dir) -> Path:
    src = chain_dir / "hf"
    shutil.copytree(presets.TINY_TRAINED, src)
    (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    gen = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": EOS_IDS}))
    return run_stage(load.STAGE, LoadConfig(source=str(src)), [], chain_dir / "ckpt").artifact.path


@pytest.fixture(scope="session")
def chat_onnx(chat_ckpt, chain_dir) -> Path:
    return run_stage(export.STAGE, ExportConfig(), [open_artifact(chat_ckpt)], chain_dir / "onnx").artifact.path


@pytest.fixture(scope="session")
def int4_onnx(chat_ckpt, chain_dir) -> Path:
    q = run_stage(quantize.STAGE, QuantizeConfig(method="rtn", bits=4, group_size=32), [open_artifact(chat_ckpt)],
                  chain_dir / "ckpt-int4").artifact
    return run_stage(export.STAGE, ExportConfig(), [q], chain_dir / "onnx-int4").artifact.path


def _engine(onnx_dir: Path, out: Path, **cfg) -> Path:
    return run_stage(build.STAGE, BuildConfig(envelope=ENVELOPE, **cfg), [open_artifact(onnx_dir)], out).artifact.path


@pytest.fixture(scope="session")
def fp32_engine(chat_onnx, chain_dir) -> Path:
    return _engine(chat_onnx, chain_dir / "engine-fp32")


@pytest.fixture(scope="session")
def int4_engine(int4_onnx, chain_dir) -> Path:
    return _engine(int4_onnx, chain_dir / "engine-int4")


@pytest.fixture(scope="session")
def kv8_engine(chat_onnx, chain_dir) -> Path:
    return _engine(chat_onnx, chain_dir / "engine-kv8", kv_cache="int8")

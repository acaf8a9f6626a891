"""Bad checkpoints get one clear line and exit 1; good ones load exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(ckpt, dst, ignore=shutil.ignore_patterns("manifest.json"))
    return dst


def _load(cli, src: Path, tmp_path: Path):
    return cli("load", src, "-o", tmp_path / "out")


def test_loads_hf_dir_and_round_trips_weights(cli, tiny_ckpt, tmp_path):
    src = _copy(tiny_ckpt, tmp_path)
    r = cli("load", src, "-o", tmp_path / "out", "--json")
    assert r.code == 0, r.err
    assert r.json()["metadata"]["architecture"] == "llama"
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "out" / "tokenizer.json").exists()
    # a preset (like a GGUF) has no "architectures" of its own; HF tools such as GenAI's builder need one
    assert json.loads((tiny_ckpt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_sharded_checkpoint_with_index(cli, tiny_ckpt, tmp_path):
    src = _copy(tiny_ckpt, tmp_path)
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, src / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[half:]}, src / "model-00002-of-00002.safetensors")
    wm = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    assert _load(cli, src, tmp_path).code == 0


@pytest.mark.parametrize("case, message", [
    ("truncated", "corrupt safetensors file"),
    ("wrong_shape", "has shape"),
    ("missing", "missing tensor"),
    ("nan", "contains NaN or Inf"),
    ("unknown_arch", "unsupported architecture 'bert'"),
    ("no_config", "no config.json"),
    ("no_weights", "no weights"),
    ("pickle", "refused to load pickle weights"),
])
def test_bad_checkpoints_exit_1_with_one_line(cli, tiny_ckpt, tmp_path, case, message):
    src = _copy(tiny_ckpt, tmp_path)
    st = src / "model.safetensors"
    if case == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif case in ("wrong_shape", "missing", "nan"):
        t = load_file(st)
        if case == "wrong_shape":
            t["model.norm.weight"] = torch.ones(3)
        elif case == "missing":
            del t["model.layers.1.mlp.up_proj.weight"]
        else:
            t["model.norm.weight"][0] = float("nan")
        save_file(t, st)
    elif case == "unknown_arch":
        cfg = json.loads((src / "config.json").read_text())
        cfg["model_type"] = "bert"
        (src / "config.json").write_text(json.dumps(cfg))
    elif case == "no_config":
        (src / "config.json").unlink()
    elif case == "no_weights":
        st.unlink()
    elif case == "pickle":
        import pickle

        st.unlink()

        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))

        (src / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    r = _load(cli, src, tmp_path)
    assert r.code == 1
    assert message in r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.partial-*"))


def test_unknown_preset_lists_presets(cli, tmp_path):
    r = cli("load", "preset:nope", "-o", tmp_path / "o")
    assert r.code == 1 and "unknown preset 'nope'" in r.err and "tiny-trained" in r.err


def _tied_bf16(tmp_path: Path, shard: str | None = None) -> Path:
    """A tied-embedding Llama in bfloat16, saved by transformers (sharded with an index when ``shard``)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    src = tmp_path / "hf"
    kw = {"max_shard_size": shard} if shard else {}
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src, **kw)
    return src


def test_bf16_sharded_tied_source_keeps_dtype_and_one_embedding(cli, tmp_path):
    src = _tied_bf16(tmp_path, shard="100KB")
    assert (src / "model.safetensors.index.json").exists()
    r = cli("load", src, "-o", tmp_path / "out", "--max-shard-gb", "0.0002", "--json")
    assert r.code == 0, r.err
    meta = r.json()["metadata"]
    assert meta["dtype"] == "bfloat16" and meta["tied_embeddings"] and meta["shards"] > 1
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "model.embed_tokens.weight" in index
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from llmopt.models.loader import load_model

    a, _ = load_model(src, "bfloat16")
    b, _ = load_model(out, "bfloat16")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert b.lm_head.weight is b.model.embed_tokens.weight  # still tied in memory


def test_dtype_conversion_on_the_fly(cli, tmp_path):
    src = _tied_bf16(tmp_path)
    r = cli("load", src, "-o", tmp_path / "f32", "--dtype", "float32", "--json")
    assert r.code == 0, r.err
    assert r.json()["metadata"]["dtype"] == "float32"
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "f32" / "model.safetensors")
    assert all(b[k].dtype == torch.float32 and torch.equal(b[k], a[k].float()) for k in a)


def test_integer_weight_and_escaping_shard_are_one_line_errors(cli, tmp_path):
    src = _tied_bf16(tmp_path)
    t = load_file(src / "model.safetensors")
    t["model.norm.weight"] = torch.ones(64, dtype=torch.int8)
    save_file(t, src / "model.safetensors")
    r = _load(cli, src, tmp_path)
    assert r.code == 1 and "model.norm.weight has dtype int8 where a float weight belongs" in r.err
    assert "Traceback" not in r.err and not (tmp_path / "out").exists()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "../../etc/passwd"}}))
    r = _load(cli, src, tmp_path)
    assert r.code == 1 and "points outside the directory" in r.err and "Traceback" not in r.err

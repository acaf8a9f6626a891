"""Quantization quality on the trained preset, measured the way validate measures it.

Teacher-forced KL / top-1 / perplexity of each dequantized checkpoint against the float model on the
held-out eval text (PyTorch, so ONNX Runtime's int8-activation kernels do not blur the comparison).
The bars are issue #3's: int8 RTN ppl +≤0.5 %, KL ≤ 5e-4, top-1 ≥ 98 %; SmoothQuant W8A8 ppl +≤1 %;
at int4 group 128, GPTQ's and AWQ's KL ≤ 0.75 × RTN's and top-1 ≥ RTN's.
"""

import numpy as np
import pytest

from llmopt.metrics import summarize, token_arrays
from llmopt.models import presets
from llmopt.models.loader import load_model, load_tokenizer
from llmopt.recipe import LoadConfig, QuantizeConfig
from llmopt.runner import run_stage
from llmopt.stages import load, quantize

pytestmark = pytest.mark.slow
WINDOW, TOKENS = 256, 4096


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "ckpt"
    art = run_stage(load.STAGE, LoadConfig(source="preset:tiny-trained"), [], out).artifact
    model, tok = load_model(out)
    ids = tok(presets.DEFAULT_EVAL_TEXT.read_text())["input_ids"][: TOKENS + 1]
    n = (len(ids) - 1) // WINDOW
    x = np.array([ids[i * WINDOW:(i + 1) * WINDOW + 1] for i in range(n)], np.int64)
    import torch

    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(x[:, :-1])).logits.numpy()
    return {"art": art, "x": x, "ref": ref, "root": out.parent}


def quality(trained, **cfg) -> dict:
    import torch

    name = "-".join(f"{v}" for v in cfg.values())
    q = run_stage(quantize.STAGE, QuantizeConfig(**cfg), [trained["art"]], trained["root"] / name).artifact
    model, _ = load_model(q.path)
    x = trained["x"]
    with torch.no_grad():
        test = model(input_ids=torch.from_numpy(x[:, :-1])).logits.numpy()
    v = test.shape[-1]
    return summarize([token_arrays(trained["ref"].reshape(-1, v), test.reshape(-1, v), x[:, 1:].reshape(-1))])


def test_int8_rtn_and_smoothquant_bars(trained):
    rtn8 = quality(trained, method="rtn", bits=8, group_size=None)
    assert rtn8["ppl_increase_pct"] <= 0.5
    assert rtn8["kl_mean"] <= 5e-4
    assert rtn8["top1_agreement"] >= 0.98
    sq = quality(trained, method="smoothquant", bits=8, group_size=None)
    assert sq["ppl_increase_pct"] <= 1.0


def test_int4_gptq_and_awq_beat_rtn_at_group_128(trained):
    rtn = quality(trained, method="rtn", bits=4, group_size=128)
    gptq = quality(trained, method="gptq", bits=4, group_size=128)
    awq = quality(trained, method="awq", bits=4, group_size=128)
    assert gptq["kl_mean"] <= 0.75 * rtn["kl_mean"], (gptq["kl_mean"], rtn["kl_mean"])
    assert awq["kl_mean"] <= 0.75 * rtn["kl_mean"], (awq["kl_mean"], rtn["kl_mean"])
    assert gptq["top1_agreement"] >= rtn["top1_agreement"]
    assert awq["top1_agreement"] >= rtn["top1_agreement"]

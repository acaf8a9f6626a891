"""The issue's quality bars on the embedded trained model, measured on the dequantized PyTorch model
(the exported artifact adds its own conversion error, which validate reports separately)."""

import copy

import pytest
import torch

from llmopt.metrics import summarize, token_arrays
from llmopt.models import presets
from llmopt.progress import SILENT
from llmopt.quant.calibrate import quantize_model
from llmopt.quant.smoothquant import act_hook
from llmopt.quant.capture import calibration_ids
from llmopt.recipe import QuantizeConfig

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (presets.TINY_TRAINED / "model.safetensors").exists(),
                                 reason="preset:tiny-trained not trained")]
EVAL_TOKENS = 2048  # validate's default
WINDOW = 256


@pytest.fixture(scope="module")
def trained():
    from llmopt.models.loader import load_model

    model, tok = load_model(presets.TINY_TRAINED)
    ids = tok(presets.DEFAULT_EVAL_TEXT.read_text(errors="replace"))["input_ids"][: EVAL_TOKENS + 1]
    wins = torch.tensor([ids[i * WINDOW:(i + 1) * WINDOW + 1] for i in range((len(ids) - 1) // WINDOW)])
    calib = calibration_ids(presets.DEFAULT_CALIB_TEXT.read_text(), tok, 64, 256)
    ref = _logits(model, wins)
    return model, wins, calib, ref


def _logits(model, wins):
    with torch.no_grad():
        out = torch.cat([model(input_ids=wins[b:b + 4, :-1], use_cache=False).logits for b in range(0, len(wins), 4)])
    return out.reshape(-1, out.shape[-1]).numpy()


@pytest.fixture(scope="module")
def measure(trained):
    model, wins, calib, ref = trained
    cache = {}

    def run(method, bits, group=128, **kw):
        key = (method, bits, group, tuple(sorted(kw.items())))
        if key not in cache:
            m = copy.deepcopy(model)
            res = quantize_model(m, QuantizeConfig(method=method, bits=bits, group_size=group, **kw), calib, SILENT)
            for name, qp in res.act_qparams.items():  # W8A8: Q/DQ on the activations as deployed
                act_hook(m.get_submodule(name), qp)
            cache[key] = summarize([token_arrays(ref, _logits(m, wins), wins[:, 1:].reshape(-1).numpy())])
        return cache[key]

    return run


def test_int8_rtn(measure):
    s = measure("rtn", 8)
    assert s["ppl_increase_pct"] <= 0.5 and s["kl_mean"] <= 5e-4 and s["top1_agreement"] >= 0.98, s


def test_w8a8_smoothquant(measure):
    s = measure("smoothquant", 8)
    assert s["ppl_increase_pct"] <= 1.0, s


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_g128_beats_rtn(measure, method):
    rtn, s = measure("rtn", 4), measure(method, 4)
    assert s["kl_mean"] <= 0.75 * rtn["kl_mean"], (s, rtn)
    assert s["top1_agreement"] >= rtn["top1_agreement"], (s, rtn)

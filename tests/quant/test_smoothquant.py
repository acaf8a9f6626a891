import pytest
import torch

from llmopt.models.registry import spec_for
from llmopt.quant.modules import fold_scales, get_weight
from llmopt.quant.rtn import quantize
from llmopt.quant.smoothquant import activation_qparams, fake_quant_activation, smooth_scales, w8a8_output_error

from .conftest import realistic, tiny_model


def _layer_io(model, n=4, seq=16):
    """Inputs of decoder layer 0 and a callable running that layer."""
    captured = {}
    layers = model.get_submodule(spec_for(model.config.model_type).layers_path)

    def hook(_m, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    ids = torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()

    def run():
        with torch.no_grad():
            out = layers[0](*captured["args"], **captured["kwargs"])
        return out[0] if isinstance(out, tuple) else out

    return layers[0], run


def _input_absmax(layer, lin, run):
    box = {}
    h = layer.get_submodule(lin).register_forward_pre_hook(lambda m, a: box.setdefault("x", a[0].detach()))
    run()
    h.remove()
    x = box["x"].reshape(-1, box["x"].shape[-1])
    return x, x.abs().amax(0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "qwen2"])
def test_folding_keeps_the_float_function(arch):
    model = realistic(tiny_model(arch))
    spec = spec_for(model.config.model_type)
    layer, run = _layer_io(model)
    ref = run()
    for grp in spec.smooth_groups:
        _, amax = _input_absmax(layer, grp.linears[0], run)
        s = smooth_scales(amax, [get_weight(layer.get_submodule(l)) for l in grp.linears], alpha=0.5)
        assert not torch.allclose(s, torch.ones_like(s))
        fold_scales(layer, grp, s)
    out = run()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_folding_into_a_quantized_previous_linear_is_exact():
    """up_proj already quantized: folding divides its QTensor row scales; the dequantized function holds."""
    model = realistic(tiny_model("llama"))
    spec = spec_for("llama")
    layer, run = _layer_io(model)
    up = layer.get_submodule("mlp.up_proj")
    qts = {"mlp.up_proj": quantize(get_weight(up), 8)}
    with torch.no_grad():
        up.weight.copy_(qts["mlp.up_proj"].dequantize())
    ref = run()
    grp = next(g for g in spec.smooth_groups if g.prev == "mlp.up_proj")
    _, amax = _input_absmax(layer, "mlp.down_proj", run)
    fold_scales(layer, grp, smooth_scales(amax, [get_weight(layer.get_submodule("mlp.down_proj"))]), qts)
    torch.testing.assert_close(run(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(get_weight(up), qts["mlp.up_proj"].dequantize())


def test_smoothing_flattens_activation_outliers_and_lowers_w8a8_error():
    g = torch.Generator().manual_seed(0)
    mag = torch.ones(128)
    mag[[3, 40, 99]] = 60.0
    x = torch.randn(2048, 128, generator=g) * mag
    w = 0.05 * torch.randn(64, 128, generator=g)
    s = smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    xs_amax = (x / s).abs().amax(0)
    assert xs_amax.max() / xs_amax.median() < 0.25 * (x.abs().amax(0).max() / x.abs().amax(0).median())
    naive_scale, _ = activation_qparams(float(x.abs().max()))
    smooth_scale, _ = activation_qparams(float(xs_amax.max()))
    naive = w8a8_output_error(x, w, quantize(w, 8).dequantize(), naive_scale)
    smoothed = w8a8_output_error(x, w, quantize(w * s, 8).dequantize(), smooth_scale, s)
    assert smoothed < 0.5 * naive


def test_uint8_activation_quantization_equals_signed_int8():
    x = torch.linspace(-3, 3, 1001)
    scale, zp = activation_qparams(3.0)
    assert zp == 128 and scale == pytest.approx(3.0 / 127)
    fq = fake_quant_activation(x, scale, zp)
    signed = torch.clamp(torch.round(x / scale), -128, 127) * scale
    torch.testing.assert_close(fq, signed, rtol=0, atol=0)
    assert (fq - x).abs().max() <= scale / 2 + 1e-7

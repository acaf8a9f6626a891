import transformers

from llmopt.models import presets
from llmopt.models.registry import ARCHS, dims_of, spec_for


def test_every_architecture_has_a_tiny_preset():
    preset_types = {presets.preset_config(n).model_type for n in presets.RANDOM_PRESETS}
    assert set(ARCHS) <= preset_types


def test_specs_name_real_transformers_classes_and_modules():
    for name, spec in ARCHS.items():
        cfg = presets.preset_config(f"tiny-{name}")
        model = getattr(transformers, spec.model_class)(cfg)
        modules = dict(model.named_modules())
        layer0 = f"{spec.layers_path}.0"
        for lin in spec.linears:
            assert f"{layer0}.{lin}" in modules, (name, lin)
        for group in spec.smooth_groups:
            assert f"{layer0}.{group.prev}" in modules, (name, group.prev)


def test_dims_map_config_fields_once():
    d = dims_of(presets.preset_config("tiny-gpt2"))
    assert (d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim) == (2, 4, 4, 16)
    d = dims_of(presets.preset_config("bench-246m"))
    assert (d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim, d.vocab_size) == (16, 16, 4, 64, 32000)


def test_bench_preset_has_about_246m_parameters():
    cfg = presets.preset_config("bench-246m")
    h, f, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    params = 2 * v * h + L * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h) + h
    assert 240e6 < params < 250e6


def test_unknown_architecture_names_supported_ones():
    import pytest

    from llmopt.errors import UserError

    with pytest.raises(UserError, match="supported: gpt2, llama, mistral, phi3, qwen2"):
        spec_for("bert")

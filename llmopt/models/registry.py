"""One small spec per supported architecture; everything else reads these fields.

Config field names differ across families (``n_layer`` vs ``num_hidden_layers``); they are mapped
once here so no other module probes ``hasattr`` chains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmopt.errors import UserError


@dataclass(frozen=True)
class SmoothGroup:
    """A normalization (or linear) whose output feeds ``linears``: where per-channel scales fold."""

    prev: str                 # module name relative to the decoder layer
    linears: tuple[str, ...]  # linears that consume prev's output (same input)


@dataclass(frozen=True)
class ArchSpec:
    name: str                       # registry name
    model_type: str                 # config.json "model_type"
    config_class: str               # transformers config class
    model_class: str                # transformers *ForCausalLM class
    layers_path: str                # dotted path to the ModuleList of decoder layers
    linears: tuple[str, ...]        # linear modules per decoder layer, in execution order
    smooth_groups: tuple[SmoothGroup, ...]
    conv1d: bool = False            # GPT-2 stores linears as Conv1D (weight is [in, out])
    field_map: tuple[tuple[str, str], ...] = ()  # normalized name -> config attribute

    def field(self, config: Any, name: str) -> Any:
        attr = dict(self.field_map).get(name, name)
        return getattr(config, attr)


_LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_GROUPS = (
    SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothGroup("mlp.up_proj", ("mlp.down_proj",)),
)
_STD_FIELDS = (("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads"),
               ("num_kv_heads", "num_key_value_heads"), ("hidden_size", "hidden_size"),
               ("vocab_size", "vocab_size"))


def _llama_like(name: str, config_class: str, model_class: str) -> ArchSpec:
    return ArchSpec(name=name, model_type=name, config_class=config_class, model_class=model_class,
                    layers_path="model.layers", linears=_LLAMA_LINEARS, smooth_groups=_LLAMA_GROUPS,
                    field_map=_STD_FIELDS)


ARCHS: dict[str, ArchSpec] = {
    "llama": _llama_like("llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": _llama_like("mistral", "MistralConfig", "MistralForCausalLM"),
    "qwen2": _llama_like("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "phi3": ArchSpec(
        name="phi3", model_type="phi3", config_class="Phi3Config", model_class="Phi3ForCausalLM",
        layers_path="model.layers",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        smooth_groups=(SmoothGroup("input_layernorm", ("self_attn.qkv_proj",)),
                       SmoothGroup("post_attention_layernorm", ("mlp.gate_up_proj",))),
        field_map=_STD_FIELDS),
    "gpt2": ArchSpec(
        name="gpt2", model_type="gpt2", config_class="GPT2Config", model_class="GPT2LMHeadModel",
        layers_path="transformer.h",
        linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        smooth_groups=(SmoothGroup("ln_1", ("attn.c_attn",)), SmoothGroup("ln_2", ("mlp.c_fc",))),
        conv1d=True,
        field_map=(("num_layers", "n_layer"), ("num_heads", "n_head"), ("num_kv_heads", "n_head"),
                   ("hidden_size", "n_embd"), ("vocab_size", "vocab_size"))),
}


def supported() -> str:
    return ", ".join(sorted(ARCHS))


def spec_for(model_type: str | None) -> ArchSpec:
    for spec in ARCHS.values():
        if spec.model_type == model_type:
            return spec
    raise UserError(f"unsupported architecture {model_type!r}", f"supported: {supported()}")


@dataclass(frozen=True)
class Dims:
    """The shape facts export, runtime and TensorRT profiles need."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


def dims_of(config: Any) -> Dims:
    spec = spec_for(getattr(config, "model_type", None))
    heads = spec.field(config, "num_heads")
    hidden = spec.field(config, "hidden_size")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = spec.field(config, "num_kv_heads") or heads
    return Dims(num_layers=spec.field(config, "num_layers"), num_heads=heads, num_kv_heads=kv,
                head_dim=head_dim, hidden_size=hidden, vocab_size=spec.field(config, "vocab_size"))

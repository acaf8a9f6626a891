"""``genai_config.json``: what ONNX Runtime GenAI needs to run an llmopt ONNX Runtime engine as it is.

The schema is the one GenAI's model builder writes (``model.decoder`` names the graph's inputs and outputs
and the KV tensor patterns, ``search`` holds the generation defaults). With the GroupQueryAttention graph
past and present share one buffer of ``kv_capacity`` positions (``past_present_share_buffer``), which is
also the context length: the rotary tables end there. A standard-attention graph concatenates its cache,
takes ``position_ids`` and is limited by the envelope's total length.
"""

from __future__ import annotations

FILE = "genai_config.json"
_OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}
GENAI_TYPES = {"llama", "mistral", "qwen2", "phi3", "gpt2"}  # GenAI's names for llmopt's architectures


def _kv_pattern(names: list[list[str]], which: int) -> str:
    """'past_key_values.%d.key' from the per-layer names, checking every layer follows it."""
    first = names[0][which]
    pattern = first.replace(".0.", ".%d.", 1)
    if any(pair[which] != pattern % i for i, pair in enumerate(names)):
        raise ValueError(f"KV tensor names do not follow one pattern: {first!r}")
    return pattern


def genai_config(io: dict, settings: dict, generation: dict, model_type: str, context_length: int,
                 eos_ids: list[int], pad_id: int, filename: str = "model.onnx") -> dict:
    """The GenAI config for a built graph; ``io``/``settings`` are the engine's io.json / session.json."""
    if model_type not in GENAI_TYPES:
        raise ValueError(f"model type {model_type!r} has no ONNX Runtime GenAI equivalent")
    names = {t["name"] for t in io["inputs"]}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in names:
        inputs["position_ids"] = "position_ids"
    inputs["past_key_names"] = _kv_pattern(io["past_names"], 0)
    inputs["past_value_names"] = _kv_pattern(io["past_names"], 1)
    outputs = {"logits": "logits", "present_key_names": _kv_pattern(io["present_names"], 0),
               "present_value_names": _kv_pattern(io["present_names"], 1)}
    session = {"log_id": "onnxruntime-genai", "provider_options": [] if settings.get("device", "cpu") == "cpu"
               else [{"cuda": {}}],
               "graph_optimization_level": _OPT_LEVELS[settings.get("load_optimization_level", "extended")],
               **{k: str(v) for k, v in (settings.get("config_entries") or {}).items()}}
    if settings.get("intra_op_num_threads"):
        session["intra_op_num_threads"] = int(settings["intra_op_num_threads"])
    g = generation
    do_sample = bool(g.get("do_sample", False))
    return {
        "model": {
            "bos_token_id": g.get("bos_token_id", eos_ids[0] if eos_ids else 0),
            "context_length": int(context_length),
            "decoder": {
                "session_options": session,
                "filename": filename,
                "head_size": io["head_dim"],
                "hidden_size": io["hidden_size"],
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": io["num_heads"],
                "num_hidden_layers": io["num_layers"],
                "num_key_value_heads": io["num_kv_heads"],
            },
            "eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0],
            "pad_token_id": pad_id,
            "type": model_type,
            "vocab_size": io["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": do_sample,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(context_length),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": io.get("attention") == "gqa",
            "repetition_penalty": float(g.get("repetition_penalty") or 1.0),
            "temperature": float(g.get("temperature") or 1.0),
            "top_k": int(g.get("top_k") or (50 if do_sample else 1)),
            "top_p": float(g.get("top_p") or 1.0),
        },
    }

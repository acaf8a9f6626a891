"""Default validation gates: chosen from what the artifact is, listed in one table.

``DEFAULT_GATES`` is the table (docs/validate.md renders it; a test keeps the two equal). The row comes
from the artifact's weights (fp32, fp16, int8 weight-only, W8A8, int4); an int8 KV cache or a quantized
lm_head loosens the row by the modifiers below (each gate takes the looser of row and modifier). A
recipe's ``validate.gates`` or ``--gate NAME=VALUE`` overrides single gates on top; ``gates: none`` /
``--no-gates`` turns gating off explicitly (the report then says UNGATED, never PASSED).

The thresholds come from measurements of the shipped recipes on preset:tiny-trained (docs/validate.md):
each is several times looser than the worst shipped artifact of its kind measured, and far from what a
garbage artifact (weights replaced by noise) scores.
"""

from __future__ import annotations

from typing import Any

from llmopt.recipe import Gates

GATE_FIELDS = ("max_logits_rel_error", "min_greedy_agreement", "max_ppl_increase_pct", "min_top1_agreement", "max_kl")

# weights kind -> gates (logits/greedy compare with the artifact's own checkpoint; ppl/top-1/KL with the
# unquantized checkpoint)
DEFAULT_GATES: dict[str, dict[str, float]] = {
    "fp32": dict(max_logits_rel_error=1e-3, min_greedy_agreement=0.9, max_ppl_increase_pct=0.1,
                 min_top1_agreement=0.995, max_kl=1e-4),
    "fp16": dict(max_logits_rel_error=2e-2, min_greedy_agreement=0.75, max_ppl_increase_pct=0.5,
                 min_top1_agreement=0.98, max_kl=5e-4),
    "int8": dict(max_logits_rel_error=2e-2, min_greedy_agreement=0.75, max_ppl_increase_pct=0.5,
                 min_top1_agreement=0.98, max_kl=5e-4),
    "w8a8": dict(max_logits_rel_error=5e-2, min_greedy_agreement=0.5, max_ppl_increase_pct=1.0,
                 min_top1_agreement=0.97, max_kl=1e-3),
    "int4": dict(max_logits_rel_error=5e-2, min_greedy_agreement=0.5, max_ppl_increase_pct=2.0,
                 min_top1_agreement=0.95, max_kl=2e-3),
}
# build options that add error on top of the weights' row (each gate takes the looser value)
MODIFIERS: dict[str, dict[str, float]] = {
    "kv_cache int8": dict(max_logits_rel_error=2e-2, min_greedy_agreement=0.75, max_ppl_increase_pct=0.5,
                          min_top1_agreement=0.98, max_kl=5e-4),
    "lm_head int8": dict(max_logits_rel_error=2e-2, min_top1_agreement=0.97, max_kl=1e-3),
    "lm_head int4": dict(max_logits_rel_error=1e-1, min_greedy_agreement=0.5, max_ppl_increase_pct=3.0,
                         min_top1_agreement=0.9, max_kl=5e-3),
}


def _looser(name: str, a: float, b: float) -> float:
    return min(a, b) if name.startswith("min_") else max(a, b)


def profile_of(chain: list[Any]) -> dict:
    """What an artifact is, from its lineage (artifact first): weights kind, KV cache, lm_head, backend."""
    weights, kv, lm_head, dtype = "fp32", "float", "none", "float32"
    for art in chain:
        cfg = art.config if isinstance(art.config, dict) else {}
        if art.stage == "build":
            kv = cfg.get("kv_cache", kv) or kv
            lm_head = cfg.get("quantize_lm_head", lm_head) or lm_head
        elif art.stage == "export":
            dtype = cfg.get("dtype", dtype) or dtype
        elif art.stage == "quantize":
            scheme = art.metadata.get("scheme", {}) if isinstance(art.metadata, dict) else {}
            bits = scheme.get("bits", cfg.get("bits"))
            method = scheme.get("method", cfg.get("method"))
            weights = "w8a8" if method == "smoothquant" else ("int4" if bits == 4 else "int8")
    if weights == "fp32" and dtype == "float16":
        weights = "fp16"
    return {"weights": weights, "kv_cache": kv, "lm_head": lm_head}


def modifiers_of(profile: dict) -> list[str]:
    mods = []
    if profile["kv_cache"] == "int8":
        mods.append("kv_cache int8")
    if profile["lm_head"] in ("int8", "int4"):
        mods.append(f"lm_head {profile['lm_head']}")
    return mods


def default_gates(profile: dict) -> dict[str, float]:
    gates = dict(DEFAULT_GATES[profile["weights"]])
    for mod in modifiers_of(profile):
        for name, value in MODIFIERS[mod].items():
            gates[name] = _looser(name, gates[name], value)
    return gates


def effective_gates(configured: Gates | str, profile: dict) -> tuple[Gates, str]:
    """The gates to apply and where they came from ('default <row>', '+ recipe', or 'none')."""
    if configured == "none":
        return Gates(), "none (explicitly disabled)"
    given = {k: v for k, v in configured.model_dump().items() if v is not None}
    row = " + ".join([profile["weights"], *modifiers_of(profile)])
    source = f"default for {row}" + (f", overridden: {', '.join(sorted(given))}" if given else "")
    return Gates(**(default_gates(profile) | given)), source


def markdown_table() -> str:
    """The table docs/validate.md shows (a test checks the doc contains exactly this)."""
    head = "| artifact | " + " | ".join(f"`{g}`" for g in GATE_FIELDS) + " |"
    lines = [head, "|---" * (len(GATE_FIELDS) + 1) + "|"]
    for name, row in DEFAULT_GATES.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[g]:g}" for g in GATE_FIELDS) + " |")
    for name, row in MODIFIERS.items():
        lines.append(f"| + {name} | " + " | ".join(f"{row[g]:g}" if g in row else "—" for g in GATE_FIELDS) + " |")
    return "\n".join(lines)

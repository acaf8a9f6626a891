"""Numbers that say how faithful an artifact is: logits error, top-1, KL, perplexity."""

from __future__ import annotations

import numpy as np
import torch


def logits_error(ref: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Max abs and relative (max abs / max |ref|) error, only where the mask is 1."""
    if mask is not None:
        sel = mask.astype(bool)
        ref, test = ref[sel], test[sel]
    diff = np.abs(ref.astype(np.float64) - test.astype(np.float64))
    scale = float(np.abs(ref).max()) or 1.0
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_rel": float(diff.max() / scale)}


def _logp(logits: np.ndarray) -> torch.Tensor:
    return torch.log_softmax(torch.from_numpy(np.asarray(logits)).double(), dim=-1)


_ROWS = 128  # tokens per chunk: the float64 log-softmax temporaries stay ~50 MB each at a 49k vocabulary


def token_arrays(ref_logits: np.ndarray, test_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token NLL (both), KL(ref || test) and top-1 match for [n, vocab] logits predicting ``targets``
    (computed ``_ROWS`` tokens at a time, so the temporaries do not grow with the number of tokens)."""
    tgt_all = np.asarray(targets, dtype=np.int64)
    parts: list[dict[str, np.ndarray]] = []
    for r0 in range(0, max(len(tgt_all), 1), _ROWS):
        lp_ref, lp_test = _logp(ref_logits[r0:r0 + _ROWS]), _logp(test_logits[r0:r0 + _ROWS])
        tgt = torch.from_numpy(tgt_all[r0:r0 + _ROWS])
        parts.append({
            "nll_ref": (-lp_ref.gather(1, tgt[:, None]).squeeze(1)).numpy(),
            "nll_test": (-lp_test.gather(1, tgt[:, None]).squeeze(1)).numpy(),
            "kl": (lp_ref.exp() * (lp_ref - lp_test)).sum(-1).numpy(),
            "top1": (lp_ref.argmax(-1) == lp_test.argmax(-1)).double().numpy(),
        })
        del lp_ref, lp_test
    return {k: np.concatenate([p[k] for p in parts]) for k in ("nll_ref", "nll_test", "kl", "top1")}


def summarize(parts: list[dict[str, np.ndarray]]) -> dict:
    """Perplexities, mean/p99 KL and top-1 agreement over the concatenated per-token arrays."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ppl_ref = float(np.exp(cat["nll_ref"].mean()))
    ppl_test = float(np.exp(cat["nll_test"].mean()))
    return {
        "tokens": int(cat["kl"].size),
        "ppl_reference": ppl_ref,
        "ppl_artifact": ppl_test,
        "ppl_increase_pct": 100.0 * (ppl_test / ppl_ref - 1.0),
        "kl_mean": float(cat["kl"].mean()),
        "kl_p99": float(np.quantile(cat["kl"], 0.99)),
        "top1_agreement": float(cat["top1"].mean()),
    }

"""The shared sampler: greedy, Hugging Face's logits processors as the reference for the filters,
seeded reproducibility independent of other sequences, and the drawn distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from llmopt.runtime.sampling import SamplingParams, Sampler, apply_repetition_penalty, filtered_probs

VOCAB = 500


def _logits(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(VOCAB) * 3).astype(np.float32)


def test_greedy_is_argmax_and_ignores_filters():
    x = _logits()
    assert Sampler(SamplingParams())(x, []) == int(np.argmax(x))
    assert Sampler(SamplingParams(top_k=5, top_p=0.5, seed=1))(x, [1, 2]) == int(np.argmax(x))


def test_repetition_penalty_matches_transformers():
    x = _logits(1)
    history = [int(np.argmax(x)), 3, 3, 17, 499]
    ours = apply_repetition_penalty(x, history, 1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), torch.from_numpy(x.copy())[None])[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # greedy after the penalty: the repeated argmax can lose its place
    x2 = x.copy()
    top2 = np.argsort(-x2)[:2]
    x2[top2[0]] = x2[top2[1]] + 0.01
    assert Sampler(SamplingParams(repetition_penalty=1.5))(x2, [int(top2[0])]) == int(top2[1])


@pytest.mark.parametrize("top_k,top_p", [(10, 1.0), (0, 0.9), (0, 0.3), (40, 0.8)])
def test_filters_keep_what_transformers_keeps(top_k, top_p):
    x = _logits(2)
    t = torch.from_numpy(x.copy())[None] / 0.7
    if top_k:
        t = TopKLogitsWarper(top_k)(None, t)
    if top_p < 1:
        t = TopPLogitsWarper(top_p)(None, t)
    ref = torch.softmax(t, -1)[0].double().numpy()
    ours = filtered_probs(x, 0.7, top_k, top_p)
    assert set(np.flatnonzero(ours)) == set(np.flatnonzero(ref > 0))
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert ours.sum() == pytest.approx(1.0)


def test_same_seed_same_tokens_whatever_else_runs():
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    rows = [_logits(s) for s in range(50)]
    alone = Sampler(params)
    a = [alone(r, []) for r in rows]
    mine, other = Sampler(params), Sampler(SamplingParams(temperature=1.0, seed=99))
    b = []
    for r in rows:  # another sequence draws between our draws
        other(r[::-1].copy(), [])
        b.append(mine(r, []))
    assert a == b
    c = [Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=4321))(r, []) for r in rows]
    assert c != a


def test_draws_follow_the_distribution():
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    n = 20000
    counts = np.bincount([s(x, []) for _ in range(n)], minlength=4) / n
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    counts = np.bincount([s(x, []) for _ in range(n)], minlength=4) / n
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.015)


def test_top_k_one_and_tiny_top_p_are_greedy():
    for seed in range(5):
        x = _logits(seed)
        assert Sampler(SamplingParams(temperature=2.0, top_k=1, seed=seed))(x, []) == int(np.argmax(x))
        assert Sampler(SamplingParams(temperature=0.5, top_p=1e-6, seed=seed))(x, []) == int(np.argmax(x))


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5},
                                {"repetition_penalty": 0}, {"temperature": float("nan")}])
def test_invalid_params_are_rejected(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)

"""Per-token metrics: chunked over tokens, equal to the whole-array computation (milliseconds)."""

import numpy as np
import torch

from llmopt import metrics


def test_token_arrays_chunked_equals_whole():
    rng = np.random.default_rng(0)
    n = 2 * metrics._ROWS + 17  # two full chunks and a partial one
    ref = rng.normal(size=(n, 300)).astype(np.float32)
    test = ref + 0.1 * rng.normal(size=ref.shape).astype(np.float32)
    tgt = rng.integers(0, 300, n)
    got = metrics.token_arrays(ref, test, tgt)
    lr, lt = (torch.log_softmax(torch.from_numpy(x).double(), -1) for x in (ref, test))
    want = {"nll_ref": -lr[torch.arange(n), tgt].numpy(), "nll_test": -lt[torch.arange(n), tgt].numpy(),
            "kl": (lr.exp() * (lr - lt)).sum(-1).numpy(), "top1": (lr.argmax(-1) == lt.argmax(-1)).double().numpy()}
    for k, v in want.items():
        assert got[k].shape == (n,) and np.allclose(got[k], v, rtol=0, atol=1e-12), k
    assert all(v.shape == (0,) for v in metrics.token_arrays(ref[:0], test[:0], tgt[:0]).values())

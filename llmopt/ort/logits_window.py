"""Logits for the last position only, when the caller asks: an overridable window before the lm_head.

A prompt of ``seq`` tokens needs the logits of its last position only (the first generated token), yet
the export computes the lm_head for every position: ``seq × hidden × vocab`` multiply-adds, a third of a
64-token prefill of a 32k-vocabulary model on a CPU and more with larger vocabularies. The rewrite slices
the lm_head's input along the sequence axis from ``logits_from``:

    hidden [batch, seq, H] → Slice(starts=logits_from, ends=+inf, axes=[1]) → lm_head → logits

``logits_from`` is a graph input backed by an initializer of the same name (value ``[0]``: every
position), so a caller that does not feed it — ONNX Runtime GenAI, validate's teacher-forced scoring —
gets exactly the graph it had; ``llmopt``'s session feeds ``[-1]`` for a prefill whose rows all end at
the last column, and the logits come back as ``[batch, 1, vocab]``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmopt.ort.graph import RewriteUnsupported, _Index

LOGITS_FROM = "logits_from"
_INT64_MAX = np.iinfo(np.int64).max


def add_logits_window(model: onnx.ModelProto) -> dict:
    """Insert the window in front of the node writing ``logits``; returns what was done (for the manifest)."""
    g = model.graph
    ix = _Index(g)
    head = ix.producer.get("logits")
    if head is None:
        raise RewriteUnsupported("no node writes logits")
    if any(i.name == LOGITS_FROM for i in g.input):
        return {"input": LOGITS_FROM, "default": 0}
    hidden = head.input[0]
    sliced = f"{hidden}/last_positions"
    g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), LOGITS_FROM),
                          numpy_helper.from_array(np.array([_INT64_MAX], np.int64), "logits_window.ends"),
                          numpy_helper.from_array(np.array([1], np.int64), "logits_window.axes")])
    g.input.append(helper.make_tensor_value_info(LOGITS_FROM, TensorProto.INT64, [1]))
    window = helper.make_node("Slice", [hidden, LOGITS_FROM, "logits_window.ends", "logits_window.axes"], [sliced],
                              name="/logits_window/Slice")
    head.input[0] = sliced
    nodes = list(g.node)
    nodes.insert(nodes.index(head), window)
    del g.node[:]
    g.node.extend(nodes)
    return {"input": LOGITS_FROM, "default": 0, "op": head.op_type}

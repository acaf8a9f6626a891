"""Norm fusion: Add → RMSNormalization into com.microsoft.SkipSimplifiedLayerNormalization."""

from __future__ import annotations

import onnx
from onnx import helper

from llmopt.ort.graph import MS_DOMAIN, _attr, _Index, _opset


def fuse_skip_rmsnorm(model: onnx.ModelProto) -> int:
    """Add(a, b) → RMSNormalization  ⇒  SkipSimplifiedLayerNormalization(a, b) (sum kept as output 3)."""
    g = model.graph
    ix = _Index(g)
    replace: dict[int, onnx.NodeProto] = {}
    drop = set()
    for n in g.node:
        if n.op_type != "RMSNormalization" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        if _attr(n, "axis", -1) != -1 or _attr(n, "stash_type", 1) != 1:
            continue
        add = ix.producer.get(n.input[0])
        if add is None or add.op_type != "Add" or id(add) in replace or id(add) in drop:
            continue
        if any(x in ix.inits or x not in ix.producer for x in add.input):
            continue  # a bias or constant, not a residual
        if n.input[1] not in ix.inits:
            continue
        fused = helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], n.input[1]],
                                 [n.output[0], "", "", add.output[0]], name=n.name + "/SkipSimplifiedLayerNorm",
                                 domain=MS_DOMAIN, epsilon=float(_attr(n, "epsilon", 1e-5)))
        replace[id(add)] = fused
        drop.add(id(n))
    nodes = []
    for n in g.node:
        if id(n) in replace:
            nodes.append(replace[id(n)])
        elif id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    if replace:
        _opset(model, MS_DOMAIN, 1)
    return len(replace)

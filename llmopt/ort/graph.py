"""Graph plumbing shared by the ONNX Runtime rewrites: producer/consumer index, attributes, pruning, opsets."""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"


class RewriteUnsupported(Exception):
    """The graph does not have the structure a rewrite recognizes; the message says where."""


class _Index:
    """Producer / consumer maps over a GraphProto."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}

    def made_by(self, name: str, op: str, why: str):  # noqa: ANN201 - NodeProto
        node = self.producer.get(name)
        if node is None or node.op_type != op:
            got = "a graph input or initializer" if node is None else node.op_type
            raise RewriteUnsupported(f"{why}: expected {op} producing {name!r}, found {got}")
        return node


def _attr(node: onnx.NodeProto, name: str, default=None):  # noqa: ANN001, ANN202
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default



def prune(graph: onnx.GraphProto) -> dict:
    """Remove nodes, initializers and inputs nothing reads (outputs are the roots)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o) or any(a.type in (onnx.AttributeProto.GRAPH,
                                                                        onnx.AttributeProto.GRAPHS)
                                                            for a in node.attribute):
            keep.append(node)
            needed.update(i for i in node.input if i)
    removed = len(graph.node) - len(keep)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    n_inits = len(graph.initializer) - len(inits)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in needed]
    dropped = [i.name for i in graph.input if i.name not in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    vi = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vi)
    return {"nodes": removed, "initializers": n_inits, "inputs": dropped}


def _opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))

"""Trace three decoder layers, then copy the last one for the rest: export cost independent of depth.

torch.export, its decompositions and the ONNX translation cost time per traced operator, so tracing a
32-layer model costs ~10x tracing three layers. The decoder layers of a supported architecture are
identical up to their weights and their slot of the KV cache, so the graph of a 3-layer trace holds
everything: layers 1 and 2 show how a layer reads the one before it (layer 0 may own constants that later
layers share, so it is not the template). Layer ``k`` (3 ≤ k < L) is a copy of layer 2 whose inputs from
layer 1 come from layer ``k-1``, whose own inputs/initializers/outputs are renamed (``layers.2.`` →
``layers.k.``, ``past_key_values.2.*`` → ``past_key_values.k.*``, ``present.2.*`` → ``present.k.*``), and
whatever read layer 2's values after the stack (the final norm) reads layer ``L-1``'s.

A node belongs to the layer named in its ``pkg.torch.onnx.name_scopes`` (``model.model.layers.<k>``); a node
without one (the KV-cache concatenation, constants) belongs to the layer that alone consumes it. The copy
is refused (``replicate_layers`` returns False and the caller traces every layer) unless layers 1 and 2
are the same graph up to that shift: same operators, attributes, and corresponding inputs.
"""

from __future__ import annotations

import ast
import re

import onnx_ir as ir

TRACED_LAYERS = 3
_SCOPES = "pkg.torch.onnx.name_scopes"


def _layer_of_scope(node: ir.Node, pattern: re.Pattern) -> int | None:
    scopes = node.metadata_props.get(_SCOPES)
    for s in ast.literal_eval(scopes) if scopes else ():
        m = pattern.match(s)
        if m:
            return int(m.group(1))
    return None


def _layers(graph: ir.Graph, scope: str) -> dict[ir.Node, int | None]:
    pattern = re.compile(rf"^{re.escape(scope)}\.(\d+)$")
    nodes = list(graph)
    layer = {n: _layer_of_scope(n, pattern) for n in nodes}
    for n in reversed(nodes):  # unscoped nodes used by one layer only belong to it
        if layer[n] is None and not any(v.is_graph_output() for v in n.outputs):
            users = {layer.get(u.node) for v in n.outputs for u in v.uses()}
            if len(users) == 1 and None not in users:
                layer[n] = users.pop()
    return layer


def _attr_key(attr: ir.Attr) -> object:
    if attr.type == ir.AttributeType.TENSOR:
        a = attr.value.numpy()
        return ("tensor", a.dtype.str, a.shape, a.tobytes())
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise _NotReplicable("a subgraph attribute")
    return (attr.type, repr(attr.value))


class _NotReplicable(Exception):
    pass


def _shifted(name: str, src: int, dst: int, scope: str) -> str:
    """``name`` with layer ``src`` renamed ``dst`` (initializers, past/present names), else itself."""
    for prefix in (f"{scope}.", "past_key_values.", "present."):
        at = name.find(f"{prefix}{src}.")
        if at >= 0 and (at == 0 or name[at - 1] == "."):
            return name[:at] + f"{prefix}{dst}." + name[at + len(f"{prefix}{src}."):]
    return name


def _check_shift(a_nodes: list[ir.Node], b_nodes: list[ir.Node], layer: dict, scope: str) -> None:
    """Layer 2 (b) must be layer 1 (a) moved up one layer."""
    if [n.op_identifier() for n in a_nodes] != [n.op_identifier() for n in b_nodes]:
        raise _NotReplicable("layers 1 and 2 have different operators")
    ia = {n: i for i, n in enumerate(a_nodes)}
    ib = {n: i for i, n in enumerate(b_nodes)}
    for a, b in zip(a_nodes, b_nodes):
        if len(a.inputs) != len(b.inputs) or len(a.outputs) != len(b.outputs):
            raise _NotReplicable(f"{b.name}: arity")
        if {k: _attr_key(v) for k, v in a.attributes.items()} != {k: _attr_key(v) for k, v in b.attributes.items()}:
            raise _NotReplicable(f"{b.name}: attributes")
        for x, y in zip(b.inputs, a.inputs):
            if x is None or y is None:
                if x is not y:
                    raise _NotReplicable(f"{b.name}: optional input")
                continue
            px, py = x.producer(), y.producer()
            if px in ib:
                ok = py in ia and ia[py] == ib[px] and y.index() == x.index()
            elif px in ia:
                ok = py is not None and layer.get(py) == 0
            elif px is None and (x.is_graph_input() or x.is_initializer()) and _shifted(x.name, 2, 1, scope) != x.name:
                ok = y.name == _shifted(x.name, 2, 1, scope) and px is None
            else:
                ok = x is y
            if not ok:
                raise _NotReplicable(f"{b.name}: input {x.name} does not correspond to {y.name}")
        for x, y in zip(b.outputs, a.outputs):
            if x.is_graph_output() != y.is_graph_output():
                raise _NotReplicable(f"{b.name}: graph outputs")


def _clone_value(v: ir.Value, name: str) -> ir.Value:
    return ir.Value(name=name, type=v.type, shape=None if v.shape is None else ir.Shape(list(v.shape)),
                    const_value=v.const_value)


def replicate_layers(model: ir.Model, n_layers: int, scope: str) -> bool:
    """Grow ``model``, traced with :data:`TRACED_LAYERS` decoder layers, to ``n_layers`` in place. ``scope``
    is the name scope of the layer list (``model.model.layers``). False (graph untouched) when the traced
    layers are not copies of each other."""
    graph = model.graph
    layer = _layers(graph, scope)
    a_nodes = [n for n in graph if layer[n] == 1]
    b_nodes = [n for n in graph if layer[n] == 2]
    try:
        _check_shift(a_nodes, b_nodes, layer, scope)
    except _NotReplicable:
        return False
    ia = {n: i for i, n in enumerate(a_nodes)}
    ib = {n: i for i, n in enumerate(b_nodes)}
    sources = {v.name: v for v in [*graph.inputs, *graph.initializers.values()]}
    inputs, outputs = list(graph.inputs), list(graph.outputs)
    prev = b_nodes  # layer k-1's nodes, in template order
    anchor = b_nodes[-1]
    pattern = re.compile(rf"{re.escape(scope)}\.2(?!\d)")
    for k in range(TRACED_LAYERS, n_layers):
        copies: list[ir.Node] = []

        def source(x: ir.Value | None) -> ir.Value | None:
            if x is None:
                return None
            p = x.producer()
            if p in ib:
                return copies[ib[p]].outputs[x.index()]
            if p in ia:
                return prev[ia[p]].outputs[x.index()]
            name = _shifted(x.name, 2, k, scope) if p is None else x.name
            if name == x.name:
                return x
            if name not in sources:
                v = sources[name] = _clone_value(x, name)
                if x.is_initializer():
                    graph.register_initializer(v)
                else:
                    inputs.append(v)
            return sources[name]

        for b in b_nodes:
            meta = {key: pattern.sub(f"{scope}.{k}", val) for key, val in b.metadata_props.items()
                    if key in (_SCOPES, "namespace")}
            node = ir.Node(b.domain, b.op_type, [source(x) for x in b.inputs],
                           attributes=[ir.Attr(a.name, a.type, a.value) for a in b.attributes.values()],
                           overload=b.overload, num_outputs=len(b.outputs), version=b.version,
                           name=f"{b.name}_layer{k}", metadata_props=meta)
            for o, t in zip(node.outputs, b.outputs):
                o.name = _shifted(t.name, 2, k, scope) if t.is_graph_output() else f"{t.name}_layer{k}"
                o.type, o.shape = t.type, None if t.shape is None else ir.Shape(list(t.shape))
                if t.is_graph_output():
                    outputs.append(o)
            copies.append(node)
        graph.insert_after(anchor, copies)
        anchor, prev = copies[-1], copies
    # after the stack, readers of layer 2 read the last layer
    for b, last in zip(b_nodes, prev):
        for t, o in zip(b.outputs, last.outputs):
            for use in list(t.uses()):
                if use.node in layer and layer[use.node] is None:
                    use.node.replace_input_with(use.idx, o)
    order = {name: i for i, name in enumerate(_io_order(n_layers))}
    for io, values in ((graph.inputs, inputs), (graph.outputs, outputs)):
        io.clear()
        io.extend(sorted(values, key=lambda v: order.get(v.name, -1)))
    graph.sort()
    return True


def _io_order(n_layers: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids", "logits"]
    for i in range(n_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value", f"present.{i}.key", f"present.{i}.value"]
    return names


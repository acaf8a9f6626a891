"""MatMul packing: sibling MatMuls reading one activation (q/k/v, gate/up) become one larger GEMM."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmopt.ort.graph import _Index, prune
from llmopt.ort.store import IN_MEMORY, TensorStore


def _weight_of(ix: _Index, name: str):  # noqa: ANN202
    """('float', (W,)) for a float initializer [K, N]; ('dq', (q, scale, zp, attrs)) for DequantizeLinear of
    initializers; None otherwise."""
    if name in ix.inits:
        t = ix.inits[name]
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(t.dims) == 2:
            return "float", (t,)
        return None
    node = ix.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or not all(i in ix.inits for i in node.input if i):
        return None
    q = ix.inits[node.input[0]]
    if len(q.dims) != 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scale = ix.inits[node.input[1]]
    zp = ix.inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    return "dq", (q, scale, zp, attrs, node)


def _signature(kind: str, parts: tuple) -> tuple:
    if kind == "float":
        return (kind, parts[0].data_type, parts[0].dims[0])
    q, scale, zp, attrs, _ = parts
    return (kind, q.data_type, q.dims[0], scale.data_type, zp is not None and zp.data_type,
            tuple(sorted((k, str(v)) for k, v in attrs.items())), len(scale.dims))


def pack_matmuls(model: onnx.ModelProto, store: TensorStore = IN_MEMORY) -> dict:
    """Sibling MatMuls reading the same activation with like weights (q/k/v, gate/up) become one MatMul over
    the concatenated weight (float, or DequantizeLinear block-wise along K / per output channel), then a Split.
    A GroupQueryAttention fed by exactly (q, k, v) takes the packed output directly (packed QKV, no Split)."""
    g = model.graph
    ix = _Index(g)
    groups: dict[tuple, list] = defaultdict(list)
    for n in g.node:
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
            continue
        w = _weight_of(ix, n.input[1])
        if w is None:
            continue
        groups[(n.input[0], _signature(*w))].append((n, w))
    replace: dict[int, list] = {}
    drop: set[int] = set()
    new_inits, packed_qkv, packed = [], 0, 0
    for (x, _sig), members in groups.items():
        if len(members) < 2:
            continue
        kind = members[0][1][0]
        nodes = [m[0] for m in members]
        base = f"{nodes[0].name or nodes[0].output[0]}.packed"
        if kind == "float":
            arrays = [store.array(m[1][1][0]) for m in members]
            widths = [a.shape[1] for a in arrays]
            new_inits.append(store.tensor(np.concatenate(arrays, axis=1), f"{base}.weight"))
            weight = new_inits[-1].name
            extra = []
        else:
            q0, s0, z0, attrs, _ = members[0][1][1]
            axis = 1 if (attrs.get("axis", 1) in (1, -1) and "block_size" not in attrs) else 0
            if axis != 1 and attrs.get("axis", 1) not in (0, -2):
                continue
            qs = [store.array(m[1][1][0]) for m in members]
            widths = [a.shape[1] for a in qs]
            cat = 0 if len(s0.dims) == 1 else 1
            ss = np.concatenate([store.array(m[1][1][1]) for m in members], axis=cat)
            inits = [store.tensor(np.concatenate(qs, axis=1), f"{base}.qweight"), store.tensor(ss, f"{base}.scales")]
            if z0 is not None:
                zs = np.concatenate([store.array(m[1][1][2]) for m in members], axis=cat)
                inits.append(store.tensor(zs, f"{base}.zeros"))
            new_inits += inits
            weight = f"{base}.weight_dq"
            extra = [helper.make_node("DequantizeLinear", [i.name for i in inits], [weight], name=f"{base}/DequantizeLinear",
                                      **attrs)]
        outputs = [n.output[0] for n in nodes]
        mm = helper.make_node("MatMul", [x, weight], [f"{base}.out"], name=f"{base}/MatMul")
        consumers = [c for o in outputs for c in ix.consumers.get(o, [])]
        gqa = consumers[0] if consumers and all(c is consumers[0] for c in consumers) else None
        if (gqa is not None and gqa.op_type == "GroupQueryAttention" and len(outputs) == 3
                and list(gqa.input[:3]) == outputs and not any(o in ix.outputs for o in outputs)):
            gqa.input[0], gqa.input[1], gqa.input[2] = mm.output[0], "", ""
            replace[id(nodes[0])] = [*extra, mm]
            packed_qkv += 1
        else:
            split_sizes = numpy_helper.from_array(np.array(widths, np.int64), f"{base}.split")
            new_inits.append(split_sizes)
            sp = helper.make_node("Split", [mm.output[0], split_sizes.name], outputs, name=f"{base}/Split", axis=-1)
            replace[id(nodes[0])] = [*extra, mm, sp]
        drop.update(id(n) for n in nodes[1:])
        packed += 1
    if not packed:
        return {"packed": 0, "packed_qkv": 0}
    nodes = []
    for n in g.node:
        if id(n) in replace:
            nodes += replace[id(n)]
        elif id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    prune(g)
    return {"packed": packed, "packed_qkv": packed_qkv}

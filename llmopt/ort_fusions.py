"""Graph rewrites for the ONNX Runtime build only; the exported ONNX stays standard for TensorRT.

``fuse_gqa`` replaces each layer's standard attention block of an opset-23 export

    MatMul → Reshape → Transpose → RotaryEmbedding ─┐            (q)
    MatMul → Reshape → Transpose → RotaryEmbedding → Concat(past_k) → [repeat_kv] ─┤  (k, present.i.key)
    MatMul → Reshape → Transpose ──────────────────→ Concat(past_v) → [repeat_kv] ─┤  (v, present.i.value)
    attention_mask → causal/padding mask ──────────────────────────────────────────┴→ Attention → Transpose → Reshape

with one ``com.microsoft.GroupQueryAttention`` (rotary inside, ``do_rotary=1``) whose past and present
KV tensors are one preallocated buffer of ``kv_capacity`` positions per layer: the session binds the
same OrtValue as ``past_key_values.i.*`` and ``present.i.*``, so a decode step writes one position and
reads the cache in place, never concatenating or repeating it. The graph inputs become

    input_ids [batch, seq] · seqlens_k int32 [batch] (tokens in the cache after this step - 1)
    · total_sequence_length int32 [1] (max over the batch of seqlens_k + 1) · past_key_values.* [batch, kv_heads, kv_capacity, head_dim]

and the rows of a batch are right-padded (each row's tokens start at cache position 0; the session
compacts a left-padded batch). The rotary cos/sin tables are computed by running the export's own
position → cos/sin subgraph for positions ``0..kv_capacity-1``, so any rope scaling the exporter traced is
kept exactly.

``fuse_skip_rmsnorm`` turns ``Add → RMSNormalization`` (residual + norm) into
``com.microsoft.SkipSimplifiedLayerNormalization``; ``pack_matmuls`` concatenates the weights of
sibling MatMuls that read the same activation (q/k/v, gate/up) so each layer runs fewer, larger GEMMs;
``quantize_lm_head`` turns the float lm_head MatMul into MatMulNBits (int4/int8, block-wise).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
SEQLENS_K = "seqlens_k"
TOTAL_SEQ = "total_sequence_length"
CAPACITY_DIM = "kv_capacity"
LM_HEAD_BLOCK = 32

_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
_REPEAT_KV_OPS = ("Unsqueeze", "Expand", "Reshape")


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


@dataclass
class _AttentionBlock:
    attention: onnx.NodeProto
    q: str                      # [batch, seq, heads*head_dim] projections
    k: str
    v: str
    past_k: str
    past_v: str
    present_k: str
    present_v: str
    out: str                    # the [batch, seq, heads*head_dim] output the o_proj reads
    remove: list                # nodes replaced (the rest goes by dead-code elimination)
    cos: str | None             # cos/sin tensors fed to the standard RotaryEmbedding (None: no rotary)
    sin: str | None
    rotary_positions: str | None  # position_ids input of RotaryEmbedding when it indexes a cache
    interleaved: int
    scale: float
    softcap: float


def _heads_view(ix: _Index, x4: str, why: str) -> str:
    """x4 = Transpose(0,2,1,3)(Reshape(x3)) → x3, the [batch, seq, heads*head_dim] projection."""
    t = ix.made_by(x4, "Transpose", why)
    if list(_attr(t, "perm", [])) != [0, 2, 1, 3]:
        raise RewriteUnsupported(f"{why}: Transpose perm {_attr(t, 'perm')} is not [0, 2, 1, 3]")
    r = ix.made_by(t.input[0], "Reshape", why)
    return r.input[0]


def _rotary(ix: _Index, x4: str, why: str) -> tuple[str, onnx.NodeProto | None]:
    """(tensor before rotary, the RotaryEmbedding node or None when there is no rotary)."""
    node = ix.producer.get(x4)
    if node is not None and node.op_type == "RotaryEmbedding" and node.domain in ("", "ai.onnx"):
        return node.input[0], node
    return x4, None


def _cache_concat(ix: _Index, name: str, why: str) -> onnx.NodeProto:
    """Walk up repeat_kv (Unsqueeze/Expand/Reshape) to the Concat(past, new) that makes present."""
    node = ix.producer.get(name)
    while node is not None and node.op_type in _REPEAT_KV_OPS:
        node = ix.producer.get(node.input[0])
    if node is None or node.op_type != "Concat" or len(node.input) != 2:
        raise RewriteUnsupported(f"{why}: no Concat(past, new) behind the attention's key/value")
    if node.input[0] not in ix.inputs or node.output[0] not in ix.outputs:
        raise RewriteUnsupported(f"{why}: the KV Concat does not read a past input and write a present output")
    return node


def find_attention_blocks(model: onnx.ModelProto) -> list[_AttentionBlock]:
    ix = _Index(model.graph)
    blocks = []
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        why = f"attention node {node.name!r}"
        if len(node.input) > 4 and any(node.input[4:]):
            raise RewriteUnsupported(f"{why}: takes its past KV directly (not the exporter's Concat form)")
        q_rot_in, q_rot = _rotary(ix, node.input[0], why)
        k_cat = _cache_concat(ix, node.input[1], why + " key")
        v_cat = _cache_concat(ix, node.input[2], why + " value")
        k_rot_in, k_rot = _rotary(ix, k_cat.input[1], why + " key")
        if (q_rot is None) != (k_rot is None):
            raise RewriteUnsupported(f"{why}: rotary on only one of query/key")
        if q_rot is not None:
            for attr in ("interleaved", "rotary_embedding_dim"):
                if _attr(q_rot, attr, 0) != _attr(k_rot, attr, 0):
                    raise RewriteUnsupported(f"{why}: query and key rotary differ in {attr}")
        consumers = ix.consumers.get(node.output[0], [])
        if len(node.output) > 1 and any(node.output[1:]):
            raise RewriteUnsupported(f"{why}: uses Attention's present/qk outputs")
        if len(consumers) != 1 or consumers[0].op_type != "Transpose" or list(_attr(consumers[0], "perm", [])) != [0, 2, 1, 3]:
            raise RewriteUnsupported(f"{why}: output is not Transpose(0,2,1,3) → Reshape")
        out_t = consumers[0]
        reshapes = ix.consumers.get(out_t.output[0], [])
        if len(reshapes) != 1 or reshapes[0].op_type != "Reshape":
            raise RewriteUnsupported(f"{why}: output is not Transpose(0,2,1,3) → Reshape")
        if _attr(node, "is_causal", 0) not in (0, 1) or _attr(node, "qk_matmul_output_mode", 0) != 0:
            raise RewriteUnsupported(f"{why}: unsupported Attention attributes")
        rot_pos = None
        if q_rot is not None and len(q_rot.input) > 3 and q_rot.input[3]:
            rot_pos = q_rot.input[3]
        blocks.append(_AttentionBlock(
            attention=node, q=_heads_view(ix, q_rot_in, why + " query"), k=_heads_view(ix, k_rot_in, why + " key"),
            v=_heads_view(ix, v_cat.input[1], why + " value"), past_k=k_cat.input[0], past_v=v_cat.input[0],
            present_k=k_cat.output[0], present_v=v_cat.output[0], out=reshapes[0].output[0],
            remove=[node, k_cat, v_cat, out_t, reshapes[0]],
            cos=q_rot.input[1] if q_rot is not None else None, sin=q_rot.input[2] if q_rot is not None else None,
            rotary_positions=rot_pos, interleaved=int(_attr(q_rot, "interleaved", 0)) if q_rot is not None else 0,
            scale=float(_attr(node, "scale", 0.0) or 0.0), softcap=float(_attr(node, "softcap", 0.0) or 0.0)))
    if not blocks:
        raise RewriteUnsupported("no standard (opset 23) Attention node in the graph")
    return blocks


def _slice_model(model: onnx.ModelProto, outputs: list[str], allowed_inputs: set[str], dtype: int) -> onnx.ModelProto:
    """A small model computing ``outputs`` from ``allowed_inputs`` (and initializers) only."""
    ix = _Index(model.graph)
    nodes, needed_inits, needed_inputs, seen = [], set(), set(), set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in ix.inits:
            needed_inits.add(name)
        elif name in ix.inputs:
            if name not in allowed_inputs:
                raise RewriteUnsupported(f"the rotary tables depend on graph input {name!r}")
            needed_inputs.add(name)
        else:
            node = ix.producer.get(name)
            if node is None:
                raise RewriteUnsupported(f"no producer for {name!r}")
            if node not in nodes:
                nodes.append(node)
                stack.extend(node.input)
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    nodes.sort(key=lambda n: order[id(n)])
    inputs = [i for i in model.graph.input if i.name in needed_inputs]
    inits = [ix.inits[n] for n in needed_inits]
    for t in inits:
        if t.data_location == TensorProto.EXTERNAL:
            raise RewriteUnsupported(f"rotary initializer {t.name!r} is external data; load the model with its data")
    graph = helper.make_graph(nodes, "rotary_tables", inputs,
                              [helper.make_tensor_value_info(o, dtype, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def rotary_tables(model: onnx.ModelProto, cos: str, sin: str, positions_input: str | None, capacity: int,
                  dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [capacity, rotary_dim/2] as the export computes them for positions 0..capacity-1."""
    import onnxruntime as ort

    ix = _Index(model.graph)
    if positions_input is not None:  # RotaryEmbedding indexes a cache: take its first rows
        tabs = []
        for name in (cos, sin):
            if name not in ix.inits:
                raise RewriteUnsupported("rotary cache with position_ids is not an initializer")
            arr = numpy_helper.to_array(ix.inits[name])
            if arr.shape[0] < capacity:
                raise RewriteUnsupported(f"rotary cache has {arr.shape[0]} positions < kv capacity {capacity}")
            tabs.append(np.ascontiguousarray(arr[:capacity]))
        return tabs[0], tabs[1]
    mini = _slice_model(model, [cos, sin], {"position_ids"}, _ONNX_TYPES[dtype])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(mini.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {}
    if any(i.name == "position_ids" for i in mini.graph.input):
        feeds["position_ids"] = np.arange(capacity, dtype=np.int64)[None, :]
    c, s = sess.run([cos, sin], feeds)
    if c.shape[-2] != capacity and c.ndim >= 2:
        raise RewriteUnsupported(f"rotary table shape {c.shape} does not follow the positions")
    c, s = c.reshape(capacity, -1), s.reshape(capacity, -1)
    return np.ascontiguousarray(c), np.ascontiguousarray(s)


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


def _set_seq_dim(value: onnx.ValueInfoProto, dim_name: str) -> None:
    d = value.type.tensor_type.shape.dim[2]
    d.ClearField("dim_value")
    d.dim_param = dim_name


def _opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def fuse_gqa(model: onnx.ModelProto, io: dict, capacity: int, local_window: int | None = None) -> dict:
    """Rewrite every attention block into GroupQueryAttention over a shared KV buffer, in place.

    Returns a summary. Raises RewriteUnsupported when the structure is not recognized; the model may then
    be partly edited, so the caller discards it.
    """
    dtype = io["dtype"]
    if dtype != "float32":
        raise RewriteUnsupported(f"GroupQueryAttention rewrite is implemented for float32 graphs, not {dtype}")
    if io["head_dim"] % 16:
        raise RewriteUnsupported(f"head_dim {io['head_dim']} is not a multiple of 16 (GroupQueryAttention rotary)")
    blocks = find_attention_blocks(model)
    if len(blocks) != io["num_layers"]:
        raise RewriteUnsupported(f"found {len(blocks)} attention blocks for {io['num_layers']} layers")
    g = model.graph
    tables: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    names: list[tuple[str, str]] = []
    for i, b in enumerate(blocks):
        if b.cos is None:
            names.append(("", ""))
            continue
        c, s = rotary_tables(model, b.cos, b.sin, b.rotary_positions, capacity, dtype)
        if c.shape[1] % 8 or 2 * c.shape[1] > io["head_dim"]:
            raise RewriteUnsupported(f"rotary dim {2 * c.shape[1]} unsupported by GroupQueryAttention")
        for cname, sname, c0, s0 in tables:
            if np.array_equal(c0, c) and np.array_equal(s0, s):
                names.append((cname, sname))
                break
        else:
            cname, sname = f"gqa.cos_cache.{len(tables)}", f"gqa.sin_cache.{len(tables)}"
            tables.append((cname, sname, c, s))
            names.append((cname, sname))
    position = {id(n): k for k, n in enumerate(g.node)}
    new_nodes: dict[int, onnx.NodeProto] = {}
    drop = set()
    for i, (b, (cname, sname)) in enumerate(zip(blocks, names)):
        attrs = {"num_heads": io["num_heads"], "kv_num_heads": io["num_kv_heads"], "do_rotary": int(bool(cname)),
                 "rotary_interleaved": b.interleaved}
        if b.scale:
            attrs["scale"] = b.scale
        if b.softcap:
            attrs["softcap"] = b.softcap
        if local_window:
            attrs["local_window_size"] = int(local_window)
        inputs = [b.q, b.k, b.v, b.past_k, b.past_v, SEQLENS_K, TOTAL_SEQ] + ([cname, sname] if cname else [])
        new_nodes[position[id(b.attention)]] = helper.make_node(
            "GroupQueryAttention", inputs, [b.out, b.present_k, b.present_v], name=f"/model/layers.{i}/attn/GroupQueryAttention",
            domain=MS_DOMAIN, **attrs)
        drop.update(id(n) for n in b.remove)
    nodes = []
    for k, n in enumerate(g.node):
        if k in new_nodes:
            nodes.append(new_nodes[k])
        if id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    for cname, sname, c, s in tables:
        g.initializer.extend([numpy_helper.from_array(c, cname), numpy_helper.from_array(s, sname)])
    g.input.extend([helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch"]),
                    helper.make_tensor_value_info(TOTAL_SEQ, TensorProto.INT32, [1])])
    pruned = prune(g)
    leftover = {"attention_mask", "position_ids"} & {i.name for i in g.input}
    if leftover:
        raise RewriteUnsupported(f"{sorted(leftover)} still used after the GroupQueryAttention rewrite")
    kv = {n for b in blocks for n in (b.past_k, b.past_v, b.present_k, b.present_v)}
    for v in list(g.input) + list(g.output):
        if v.name in kv:
            _set_seq_dim(v, CAPACITY_DIM)
    _opset(model, MS_DOMAIN, 1)
    return {"attention": "gqa", "layers": len(blocks), "kv_capacity": capacity, "rotary_tables": len(tables),
            "removed_nodes": pruned["nodes"], "removed_inputs": pruned["inputs"]}


def gqa_io(io: dict, capacity: int) -> dict:
    """io.json for a graph rewritten by ``fuse_gqa``."""
    kv_shape = ["batch", io["num_kv_heads"], CAPACITY_DIM, io["head_dim"]]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": SEQLENS_K, "dtype": "int32", "shape": ["batch"]},
              {"name": TOTAL_SEQ, "dtype": "int32", "shape": [1]}]
    for t in io["inputs"]:
        if t["name"].startswith("past_key_values."):
            inputs.append({**t, "shape": kv_shape})
    outputs = [{**t, "shape": kv_shape} if t["name"].startswith("present.") else t for t in io["outputs"]]
    return {**io, "inputs": inputs, "outputs": outputs, "attention": "gqa", "kv_capacity": capacity,
            "padding": "right", "kv_layout": "batch,kv_heads,kv_capacity,head_dim (past and present share one buffer)"}


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


def lm_head_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The MatMul that writes ``logits`` from a float weight initializer."""
    ix = _Index(model.graph)
    node = ix.producer.get("logits")
    if node is None or node.op_type != "MatMul":
        raise RewriteUnsupported(f"logits are not written by a MatMul ({node.op_type if node else 'no producer'})")
    weight = ix.inits.get(node.input[1])
    if weight is None or weight.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise RewriteUnsupported("the lm_head weight is not a float initializer (already quantized?)")
    return node


def rtn_blockwise(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of ``w`` [K, N] per block of ``block_size`` along K.

    Returns (q unsigned [N, k_blocks, block_size] with zero point 2**(bits-1), scales [N, k_blocks]). As in
    Q4_0, the scale maps each block's largest-magnitude value to the negative end of the range (-8 for
    int4, -128 for int8), so a block uses the whole signed range.
    """
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, blocks, block_size)
    idx = np.abs(wt).argmax(axis=2)[..., None]
    peak = np.take_along_axis(wt, idx, axis=2)[..., 0]
    half = 2 ** (bits - 1)
    scale = peak / -half
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(wt / scale[..., None]), -half, half - 1) + half
    return q.astype(np.uint8), scale.astype(np.float32)


def pack_nbits(q: np.ndarray, bits: int) -> np.ndarray:
    """[N, k_blocks, block] unsigned values → MatMulNBits' B [N, k_blocks, block*bits/8] (low nibble first)."""
    if bits == 8:
        return q
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def quantize_lm_head(model: onnx.ModelProto, bits: int, accuracy_level: int,
                     block_size: int = LM_HEAD_BLOCK) -> tuple[onnx.ModelProto, dict]:
    """Replace the float lm_head MatMul with MatMulNBits (symmetric block-wise RTN), in place."""
    node = lm_head_node(model)
    g = model.graph
    weight = next(t for t in g.initializer if t.name == node.input[1])
    w = numpy_helper.to_array(weight).astype(np.float32)
    k, n = w.shape
    q, scale = rtn_blockwise(w, bits, block_size)
    deq = ((q.astype(np.float32) - 2 ** (bits - 1)) * scale[..., None]).reshape(n, -1)[:, :k].T
    packed = pack_nbits(q, bits)
    base = "lm_head"
    inits = [numpy_helper.from_array(packed, f"{base}.qweight"), numpy_helper.from_array(scale, f"{base}.scales")]
    fused = helper.make_node("MatMulNBits", [node.input[0], inits[0].name, inits[1].name], list(node.output),
                             name="/lm_head/MatMulNBits", domain=MS_DOMAIN, K=k, N=n, bits=bits,
                             block_size=block_size, accuracy_level=accuracy_level)
    nodes = [fused if x is node else x for x in g.node]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    prune(g)
    _opset(model, MS_DOMAIN, 1)
    err = float(np.abs(deq - w).max() / (np.abs(w).max() or 1.0))
    return model, {"bits": bits, "block_size": block_size, "symmetric": True, "shape": [k, n],
                   "accuracy_level": accuracy_level, "weight_max_rel_error": round(err, 6)}


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


def pack_matmuls(model: onnx.ModelProto) -> dict:
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
            arrays = [numpy_helper.to_array(m[1][1][0]) for m in members]
            widths = [a.shape[1] for a in arrays]
            new_inits.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{base}.weight"))
            weight = new_inits[-1].name
            extra = []
        else:
            q0, s0, z0, attrs, _ = members[0][1][1]
            axis = 1 if (attrs.get("axis", 1) in (1, -1) and "block_size" not in attrs) else 0
            if axis != 1 and attrs.get("axis", 1) not in (0, -2):
                continue
            qs = [numpy_helper.to_array(m[1][1][0]) for m in members]
            widths = [a.shape[1] for a in qs]
            cat = 0 if len(s0.dims) == 1 else 1
            ss = np.concatenate([numpy_helper.to_array(m[1][1][1]) for m in members], axis=cat)
            inits = [numpy_helper.from_array(np.concatenate(qs, axis=1), f"{base}.qweight"),
                     numpy_helper.from_array(ss, f"{base}.scales")]
            if z0 is not None:
                zs = np.concatenate([numpy_helper.to_array(m[1][1][2]) for m in members], axis=cat)
                inits.append(numpy_helper.from_array(zs, f"{base}.zeros"))
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

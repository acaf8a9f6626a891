"""GroupQueryAttention rewrite: find the export's attention blocks, compute rotary tables, rewrite, io.json."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmopt.ort.graph import MS_DOMAIN, RewriteUnsupported, _attr, _Index, _opset, prune
from llmopt.ort.store import IN_MEMORY, TensorStore

MASK = "attention_mask"
SEQLENS_K = "seqlens_k"                 # derived inside the graph from attention_mask (no longer graph inputs)
TOTAL_SEQ = "total_sequence_length"
CAPACITY_DIM = "kv_capacity"

_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
_REPEAT_KV_OPS = ("Unsqueeze", "Expand", "Reshape")


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
                  dtype: str = "float32", store: TensorStore = IN_MEMORY) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [capacity, rotary_dim/2] as the export computes them for positions 0..capacity-1."""
    import onnxruntime as ort

    ix = _Index(model.graph)
    if positions_input is not None:  # RotaryEmbedding indexes a cache: take its first rows
        tabs = []
        for name in (cos, sin):
            if name not in ix.inits:
                raise RewriteUnsupported("rotary cache with position_ids is not an initializer")
            arr = store.array(ix.inits[name])
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

def _mask_reformat_nodes() -> list[onnx.NodeProto]:
    """seqlens_k and total_sequence_length from the 2-D attention_mask, as GenAI's builder derives them:
    ReduceSum(mask, axis 1) - 1 → int32, and Shape(mask)[1] → int32 (a scalar)."""
    base = "/model/attn_mask_reformat/attn_mask_subgraph"
    one = f"{base}/one"
    axes = f"{base}/axes"
    return [
        helper.make_node("Constant", [], [one], name=f"{base}/One", value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Constant", [], [axes], name=f"{base}/Axes", value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("ReduceSum", [MASK, axes], [f"{base}/ReduceSum/output_0"], name=f"{base}/ReduceSum", keepdims=0),
        helper.make_node("Sub", [f"{base}/ReduceSum/output_0", one], [f"{base}/Sub/output_0"], name=f"{base}/Sub"),
        helper.make_node("Cast", [f"{base}/Sub/output_0"], [SEQLENS_K], name=f"{base}/Sub/Cast", to=TensorProto.INT32),
        helper.make_node("Shape", [MASK], [f"{base}/Shape/output_0"], name=f"{base}/Shape"),
        helper.make_node("Gather", [f"{base}/Shape/output_0", one], [f"{base}/Gather/output_0"], name=f"{base}/Gather",
                         axis=0),
        helper.make_node("Cast", [f"{base}/Gather/output_0"], [TOTAL_SEQ], name=f"{base}/Gather/Cast", to=TensorProto.INT32),
    ]


def _set_seq_dim(value: onnx.ValueInfoProto, dim_name: str) -> None:
    d = value.type.tensor_type.shape.dim[2]
    d.ClearField("dim_value")
    d.dim_param = dim_name



def fuse_gqa(model: onnx.ModelProto, io: dict, capacity: int, local_window: int | None = None,
             store: TensorStore = IN_MEMORY) -> dict:
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
        c, s = rotary_tables(model, b.cos, b.sin, b.rotary_positions, capacity, dtype, store)
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
    nodes = _mask_reformat_nodes()  # reads only the attention_mask input: first in topological order
    for k, n in enumerate(g.node):
        if k in new_nodes:
            nodes.append(new_nodes[k])
        if id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    for cname, sname, c, s in tables:
        g.initializer.extend([store.tensor(c, cname), store.tensor(s, sname)])
    pruned = prune(g)
    if "position_ids" in {i.name for i in g.input}:
        raise RewriteUnsupported("position_ids still used after the GroupQueryAttention rewrite")
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
              {"name": MASK, "dtype": "int64", "shape": ["batch", "total"]}]
    for t in io["inputs"]:
        if t["name"].startswith("past_key_values."):
            inputs.append({**t, "shape": kv_shape})
    outputs = [{**t, "shape": kv_shape} if t["name"].startswith("present.") else t for t in io["outputs"]]
    return {**io, "inputs": inputs, "outputs": outputs, "attention": "gqa", "kv_capacity": capacity,
            "padding": "right",
            "mask": "row sum = the row's tokens in the cache after this step; width = the longest row",
            "kv_layout": "batch,kv_heads,kv_capacity,head_dim (past and present share one buffer)"}

"""How ONNX Runtime's weight kernels scale with the rows of a step: the evidence behind docs/serving.md.

One graph holds a model's linears (default: bench-246m's 16 layers × packed qkv, o, packed gate/up, down),
each a single node fed by one of two inputs, and is timed at M = 1, 8, 64 rows per configuration. A decode
step of B sequences is M = B; a prefill of T tokens is M = T. Weights are random: a kernel's speed does not
depend on their values.

    .venv/bin/python scripts/matmul_kernels.py [--threads 2] [--rounds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (N, K) of one bench-246m layer: packed q/k/v, o, packed gate/up, down
LAYER = [(1536, 1024), (1024, 1024), (5632, 1024), (1024, 2816)]


def _nbits(name: str, n: int, k: int, bits: int, block: int, level: int, rng) -> tuple[onnx.NodeProto, list]:
    blocks = -(-k // block)
    codes = rng.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
    inits = [numpy_helper.from_array(codes, f"{name}.q"), numpy_helper.from_array(scales, f"{name}.s")]
    node = helper.make_node("MatMulNBits", [f"x{k}", f"{name}.q", f"{name}.s"], [f"{name}.y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=level)
    return node, inits


def _dynamic_int8(name: str, n: int, k: int, rng) -> tuple[onnx.NodeProto, list]:
    w = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    inits = [numpy_helper.from_array(w, f"{name}.q"),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), f"{name}.s"),
             numpy_helper.from_array(np.zeros(n, np.int8), f"{name}.z")]
    node = helper.make_node("DynamicQuantizeMatMul", [f"x{k}", f"{name}.q", f"{name}.s", f"{name}.z"],
                            [f"{name}.y"], domain="com.microsoft")
    return node, inits


def _float(name: str, n: int, k: int, rng) -> tuple[onnx.NodeProto, list]:
    w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(np.float32)
    return helper.make_node("MatMul", [f"x{k}", f"{name}.w"], [f"{name}.y"]), [numpy_helper.from_array(w, f"{name}.w")]


def build(kind: str, layers: int, rng) -> bytes:
    nodes, inits, outs = [], [], []
    for i in range(layers):
        for j, (n, k) in enumerate(LAYER):
            name = f"l{i}.{j}"
            if kind == "float32":
                node, ini = _float(name, n, k, rng)
            elif kind == "int8-dynamic":
                node, ini = _dynamic_int8(name, n, k, rng)
            else:  # int{bits}-b{block}-acc{level}
                bits, block, level = map(int, re.fullmatch(r"int(\d+)-b(\d+)-acc(\d)", kind).groups())
                node, ini = _nbits(name, n, k, bits, block, level, rng)
            nodes.append(node)
            inits += ini
            outs.append(helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, ["M", n]))
    ks = sorted({k for _, k in LAYER})
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["M", k]) for k in ks]
    graph = helper.make_graph(nodes, "linears", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def time_rows(sess: ort.InferenceSession, rows: int, rounds: int, rng) -> float:
    feeds = {i.name: rng.standard_normal((rows, int(i.name[1:])), dtype=np.float32) for i in sess.get_inputs()}
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="int4-b128-acc4,int4-b32-acc4,int4-b128-acc0,int8-b128-acc4,int8-dynamic,float32")
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = [int(r) for r in a.rows.split(",")]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    results = []
    print(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, {a.threads} threads")
    print(f"{'kernel':<16}" + "".join(f"{'M=' + str(r):>10}" for r in rows) + f"{'M=8/M=1':>10}")
    for kind in a.kinds.split(","):
        sess = ort.InferenceSession(build(kind, a.layers, rng), opts, providers=["CPUExecutionProvider"])
        ms = {r: time_rows(sess, r, a.rounds, rng) for r in rows}
        ratio = ms[8] / ms[1] if 1 in ms and 8 in ms else None
        results.append({"kernel": kind, "ms": ms, "m8_over_m1": ratio})
        print(f"{kind:<16}" + "".join(f"{ms[r]:>10.2f}" for r in rows) + (f"{ratio:>10.2f}" if ratio else ""))
        del sess
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"onnxruntime": ort.__version__, "threads": a.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Quantized checkpoints export as portable QDQ ONNX that matches the dequantized PyTorch model."""

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llmopt.quant.format import load_dequantized

CASES = {
    "int4-g32-sym": ["--method", "rtn", "--bits", "4", "--group-size", "32"],
    "int4-g32-asym": ["--method", "rtn", "--bits", "4", "--group-size", "32", "--asymmetric"],
    "int8-channel": ["--method", "rtn", "--bits", "8", "--group-size", "0"],
    "w8a8-smoothquant": ["--method", "smoothquant", "--bits", "8", "--group-size", "0", "--samples", "4", "--seq-len", "64"],
}


def _run_exact(onnx_dir, ids, mask):
    io = json.loads((onnx_dir / "io.json").read_text())
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # exact dequantization
    s = ort.InferenceSession(str(onnx_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(1) - 1, 0, None)}
    for k, v in io["past_names"]:
        feed[k] = feed[v] = np.zeros((ids.shape[0], io["num_kv_heads"], 0, io["head_dim"]), np.float32)
    return s.run(["logits"], feed)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_export_is_standard_qdq_and_exact(cli, tiny_ckpt, tmp_path, case):
    q, x = tmp_path / "q", tmp_path / "x"
    r = cli("quantize", tiny_ckpt, "-o", q, *CASES[case])
    assert r.code == 0, r.err
    r = cli("export", q, "-o", x, "--json")
    assert r.code == 0, r.err
    model = onnx.load(str(x / "model.onnx"), load_external_data=False)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, "contrib ops leaked into the export"
    ops = Counter(n.op_type for n in model.graph.node)
    n_linear = 7 * 2  # q,k,v,o,gate,up,down per layer; lm_head kept float
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("/weight/DequantizeLinear")]
    assert len(dqs) == n_linear
    inits = {t.name: t for t in model.graph.initializer}
    qweight = inits[dqs[0].input[0]]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dqs[0].attribute}
    if case.startswith("int4"):
        assert qweight.data_type == onnx.TensorProto.INT4 and attrs == {"axis": 0, "block_size": 32}
        assert (len(dqs[0].input) == 3) == case.endswith("asym")
    else:
        assert qweight.data_type == onnx.TensorProto.INT8 and attrs == {"axis": 1}
    if case.startswith("w8a8"):
        assert ops["QuantizeLinear"] == n_linear
    else:
        assert "QuantizeLinear" not in ops

    ids = np.array([[0, 0, 5, 9, 13, 2], [7, 3, 11, 1, 4, 8]], np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)
    got = _run_exact(x, ids, mask)
    ref_model = load_dequantized(q)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(np.clip(mask.cumsum(1) - 1, 0, None))).logits.numpy()
    sel = mask.astype(bool)
    rel = np.abs(got[sel] - ref[sel]).max() / np.abs(ref[sel]).max()
    assert rel <= 1e-4, rel

"""TensorRT's Q/DQ rules (signed, symmetric) checked on small ONNX graphs, and the build refusing early."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmopt.errors import UserError
from llmopt.progress import SILENT
from llmopt.recipe import BuildConfig
from llmopt.stages import build_trt
from llmopt.trt.qdq import int8_from_uint8, qdq_problems

from .conftest import onnx_artifact, tiny_onnx


def arr(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(values, name)


def act_qdq(zp: np.ndarray | None, out_dtype: int | None = None) -> tuple[list, list]:
    q_in = ["x", "s"] + (["z"] if zp is not None else [])
    attrs = {"output_dtype": out_dtype} if out_dtype else {}
    nodes = [helper.make_node("QuantizeLinear", q_in, ["xq"], name="act/Q", **attrs),
             helper.make_node("DequantizeLinear", ["xq", "s"] + (["z"] if zp is not None else []), ["xd"], name="act/DQ"),
             helper.make_node("MatMul", ["xd", "w"], ["y"])]
    inits = [arr("s", np.array(0.1, np.float32))] + ([arr("z", zp)] if zp is not None else [])
    return nodes, inits


def weight_dq(q: np.ndarray, zp: np.ndarray | None = None, **attrs: int) -> tuple[list, list]:
    scale = np.full((q.shape[0] // attrs["block_size"], q.shape[1]) if "block_size" in attrs else (q.shape[1],),
                    0.02, np.float32)
    inputs = ["wq", "ws"] + (["wz"] if zp is not None else [])
    nodes = [helper.make_node("DequantizeLinear", inputs, ["wd"], name="w/DQ", **attrs),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    return nodes, [arr("wq", q), arr("ws", scale)] + ([arr("wz", zp)] if zp is not None else [])


def load(tmp_path: Path, built: tuple[list, list]) -> onnx.ModelProto:
    return onnx.load(str(tiny_onnx(tmp_path / "m.onnx", *built)), load_external_data=False)


def problems(tmp_path: Path, built: tuple[list, list]) -> list[str]:
    return qdq_problems(load(tmp_path, built), tmp_path)  # zero points stored as external data here


def test_symmetric_int8_and_int4_are_fine(tmp_path: Path) -> None:
    assert problems(tmp_path, act_qdq(np.array(0, np.int8))) == []
    assert problems(tmp_path, act_qdq(None, TensorProto.INT8)) == []
    assert problems(tmp_path, weight_dq(np.ones((16, 16), np.int8), axis=1)) == []
    int4 = np.ones((32, 16), ml_dtypes.int4)
    assert problems(tmp_path, weight_dq(int4, axis=0, block_size=16)) == []


def test_uint8_activation_with_zero_point_is_named(tmp_path: Path) -> None:
    found = problems(tmp_path, act_qdq(np.array(128, np.uint8)))
    assert "act/Q: quantized type UINT8; TensorRT takes signed INT8/INT4" in found[0]
    assert any("act/Q: non-zero zero point" in p for p in found)


def test_quantize_without_zero_point_means_uint8(tmp_path: Path) -> None:
    assert problems(tmp_path, act_qdq(None))[0].startswith("act/Q: quantized type UINT8")


def test_asymmetric_weights_are_named(tmp_path: Path) -> None:
    q = np.ones((16, 16), np.int8)
    found = problems(tmp_path, weight_dq(q, np.full((16,), 3, np.int8), axis=1))
    assert found == ["w/DQ: non-zero zero point; TensorRT quantization is symmetric (zero point 0)"]
    found = problems(tmp_path, weight_dq(np.ones((32, 16), ml_dtypes.uint4), axis=0, block_size=16))
    assert found[0].startswith("w/DQ: quantized type UINT4")


def test_uint8_zero_point_128_is_rewritten_exactly(tmp_path: Path) -> None:
    built = act_qdq(np.array(128, np.uint8))
    path = tmp_path / "inline.onnx"
    onnx.save_model(onnx.helper.make_model(onnx.helper.make_graph(
        built[0], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [arr("w", np.ones((16, 16), np.float32)), *built[1]]), opset_imports=[helper.make_opsetid("", 21)]), str(path))
    model = onnx.load(str(path))
    assert int8_from_uint8(model) == 1
    z = next(t for t in model.graph.initializer if t.name == "z")
    assert z.data_type == TensorProto.INT8 and numpy_helper.to_array(z) == 0
    assert qdq_problems(model, tmp_path) == []
    # the same quantizer: uint8 zp 128 and int8 zp 0 give the same dequantized values
    ort = pytest.importorskip("onnxruntime")

    x = np.linspace(-20, 20, 32, dtype=np.float32).reshape(2, 16)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)


def test_other_uint8_zero_points_are_left_and_reported(tmp_path: Path) -> None:
    model = load(tmp_path, act_qdq(np.array(100, np.uint8)))
    assert int8_from_uint8(model) == 0


def test_build_refuses_before_tensorrt_is_needed(tmp_path: Path, io: dict) -> None:
    src = onnx_artifact(tmp_path / "onnx", io)
    tiny_onnx(src.file("model.onnx"), *act_qdq(np.array(100, np.uint8)))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="Q/DQ node\\(s\\) TensorRT cannot build, first: act/Q: quantized type UINT8"):
        build_trt.run(BuildConfig(backend="tensorrt", device="cuda"), [src], out, SILENT)


def test_build_parses_the_rewritten_copy_beside_its_data(tmp_path: Path, fake_trt, fake_gpu, cache_dir: Path,
                                                        io: dict) -> None:  # noqa: ANN001
    rec = fake_trt.install(io)
    src = onnx_artifact(tmp_path / "onnx", io)
    path = src.file("model.onnx")
    nodes, inits = act_qdq(np.array(128, np.uint8))
    onnx.save_model(onnx.helper.make_model(onnx.helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [arr("w", np.ones((16, 16), np.float32)), *inits]), opset_imports=[helper.make_opsetid("", 21)]),
        str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=64)
    out = tmp_path / "out"
    out.mkdir()
    meta = build_trt.run(BuildConfig(backend="tensorrt", device="cuda"), [src], out, SILENT)
    (parsed,) = rec.of("parser.parse_from_file")
    listing, data = rec.of("parser.saw")[0]
    assert parsed[0] != str(path.resolve()) and listing == ["model.onnx", "model.onnx.data"]
    z = next(t for t in onnx.load_from_string(data).graph.initializer if t.name == "z")
    assert z.data_type == TensorProto.INT8
    assert onnx.load(str(path), load_external_data=False) != onnx.load_from_string(data)  # source untouched
    assert meta["onnx_rewrites"] == {"uint8_zero_point_128_to_int8": 1}
    assert "rewritten as int8 zero points of 0" in (out / "build.log").read_text()

"""engine.json metadata and the load-time compatibility rules (pure logic)."""

from __future__ import annotations

import json

import pytest

from llmopt.errors import UserError
from llmopt.recipe import Envelope
from llmopt.trt.compat import (check_build_request, check_engine_compat, engine_metadata, precision_of,
                               version_tuple)
from llmopt.trt.gpu import GpuInfo
from llmopt.trt.profiles import derive_profiles

from .conftest import make_io

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
T4 = GpuInfo("Tesla T4", "7.5")


def meta(version: str = "10.13.0.35", gpu: GpuInfo = H100, hw: str = "none", vc: bool = False) -> dict:
    io = make_io()
    return engine_metadata(tensorrt_version=version, gpu=gpu, profiles=derive_profiles(Envelope(), io), io=io,
                           hardware_compat=hw, version_compatible=vc, workspace_gib=4.0, engine_bytes=123)


def refusal(m: dict, version: str, gpu: GpuInfo) -> str:
    with pytest.raises(UserError) as exc:
        check_engine_compat(m, version, gpu, where="eng")
    text = str(exc.value)
    assert "\n" not in text  # one clear line
    return text


def test_version_tuple() -> None:
    assert version_tuple("10.13.0.35") == (10, 13, 0, 35)
    assert version_tuple("11.0.0rc1") == (11, 0)
    assert version_tuple("10.13.0.35") < version_tuple("11.1.0")


def test_same_machine_is_fine() -> None:
    assert check_engine_compat(meta(), "10.13.0.35", H100) == []


def test_other_tensorrt_version_is_refused() -> None:
    text = refusal(meta(), "10.14.1", H100)
    assert "built with TensorRT 10.13.0.35, this machine has TensorRT 10.14.1" in text
    assert "--version-compatible" in text


def test_version_compatible_runs_on_newer_not_older() -> None:
    m = meta(vc=True)
    assert check_engine_compat(m, "11.1.0", H100) == []
    assert check_engine_compat(m, "10.13.0.35", H100) == []
    assert "older TensorRT 10.8.0" in refusal(m, "10.8.0", H100)


def test_other_compute_capability_is_refused() -> None:
    text = refusal(meta(), "10.13.0.35", A100)
    assert "built for compute capability 9.0" in text and "this GPU (NVIDIA A100-SXM4-80GB) is 8.0" in text
    assert "--hardware-compat" in text
    assert "9.0" in refusal(meta(hw="same-compute-capability"), "10.13.0.35", A100)


def test_ampere_plus_runs_on_any_ampere_or_newer() -> None:
    m = meta(gpu=A100, hw="ampere+")
    assert check_engine_compat(m, "10.13.0.35", H100) == []
    assert "Ampere+" in refusal(m, "10.13.0.35", T4)


def test_same_capability_other_gpu_warns() -> None:
    warnings = check_engine_compat(meta(), "10.13.0.35", GpuInfo("NVIDIA H100 PCIe", "9.0"))
    assert len(warnings) == 1 and "built on NVIDIA H100 80GB HBM3" in warnings[0]
    assert check_engine_compat(meta(hw="same-compute-capability"), "10.13.0.35", GpuInfo("NVIDIA H100 PCIe", "9.0")) == []


def test_incomplete_engine_json_is_refused() -> None:
    m = meta()
    del m["gpu"]
    assert "missing gpu" in refusal(m, "10.13.0.35", H100)


def test_build_request_needs_capable_gpu() -> None:
    check_build_request("ampere+", A100)
    check_build_request("same-compute-capability", T4)
    with pytest.raises(UserError, match="compute capability 8.0\\+"):
        check_build_request("ampere+", T4)


def test_precision_comes_from_the_export() -> None:
    assert precision_of(make_io("float16"))["mode"] == "fp16"
    assert precision_of(make_io("float32"))["mode"] == "fp32"
    assert precision_of(make_io("float16", {"method": "smoothquant", "bits": 8}))["mode"] == "int8 W8A8 (smoothquant)"
    assert precision_of(make_io("float16", {"method": "awq", "bits": 4, "group_size": 128}))["mode"] == \
        "int4 weight-only (awq)"


def test_metadata_is_json_and_complete() -> None:
    m = json.loads(json.dumps(meta()))
    assert {"tensorrt_version", "gpu", "profiles", "precision", "io", "hardware_compat",
            "version_compatible"} <= m.keys()
    assert m["gpu"] == {"name": H100.name, "compute_capability": "9.0"}
    assert [p["name"] for p in m["profiles"]] == ["prefill", "decode"]

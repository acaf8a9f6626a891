import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import numpy_helper

from llmopt.quant.packing import pack_int4, unpack_int4


@pytest.mark.parametrize("signed", [True, False])
def test_all_16_values_round_trip(signed):
    lo = -8 if signed else 0
    q = torch.arange(lo, lo + 16, dtype=torch.int8).reshape(2, 8)
    packed = pack_int4(q, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 4)
    assert torch.equal(unpack_int4(packed, signed), q)


@pytest.mark.parametrize("signed", [True, False])
def test_all_256_bytes_round_trip(signed):
    b = torch.arange(256, dtype=torch.int16).to(torch.uint8).reshape(16, 16)
    assert torch.equal(pack_int4(unpack_int4(b, signed), signed), b)


def test_low_nibble_is_even_index():
    assert pack_int4(torch.tensor([[1, 2]], dtype=torch.int8)).item() == 0x21
    assert pack_int4(torch.tensor([[-1, 0]], dtype=torch.int8)).item() == 0x0F
    assert pack_int4(torch.tensor([[0, -8]], dtype=torch.int8)).item() == 0x80
    assert pack_int4(torch.tensor([[15, 0]], dtype=torch.uint8), signed=False).item() == 0x0F


@pytest.mark.parametrize("signed", [True, False])
def test_bytes_match_onnx_int4_storage(signed):
    g = torch.Generator().manual_seed(0)
    lo = -8 if signed else 0
    q = torch.randint(lo, lo + 16, (6, 10), generator=g, dtype=torch.int8)
    npdt = ml_dtypes.int4 if signed else ml_dtypes.uint4
    proto = numpy_helper.from_array(q.numpy().astype(npdt), "w")
    assert proto.raw_data == pack_int4(q, signed).numpy().tobytes()
    back = numpy_helper.to_array(proto).astype(np.int8)
    assert np.array_equal(back, unpack_int4(pack_int4(q, signed), signed).numpy())


@pytest.mark.parametrize("shape", [(3, 5), (7,), (2, 3, 1)])
def test_odd_last_dim_rejected(shape):
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(shape, dtype=torch.int8))


def test_scalar_and_out_of_range_and_float_rejected():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor(1, dtype=torch.int8))
    with pytest.raises(ValueError, match="range"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="range"):
        pack_int4(torch.tensor([[-1, 0]], dtype=torch.int8), signed=False)
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 2))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8))

import numpy as np
import pytest
import torch

from libe_cnn import codec
from libe_cnn.wire import from_wire, to_wire


def test_float32_is_exact_and_a_view():
    flat = torch.randn(1000)
    wire = to_wire(flat, "float32")
    assert wire.dtype == np.float32 and np.shares_memory(wire, flat.numpy())
    np.testing.assert_array_equal(from_wire(codec.decode(codec.encode(wire)), "float32"), flat.numpy())


@pytest.mark.parametrize("wire, rtol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_16_bit_halves_the_bytes_and_rounds(wire, rtol):
    flat = torch.randn(1000)
    sent = to_wire(flat, wire)
    assert sent.nbytes == 2000  # 2 bytes a value instead of 4
    back = from_wire(codec.decode(codec.encode(sent)), wire)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, flat.numpy(), rtol=rtol, atol=1e-4)


def test_bfloat16_matches_torch_rounding():
    flat = torch.tensor([1.0, -2.5, 3.14159, 1e-20, 65504.0, float("inf")])
    expected = flat.to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(from_wire(to_wire(flat, "bfloat16"), "bfloat16"), expected)


def test_type_mismatch_is_refused():
    with pytest.raises(ValueError):
        from_wire(np.zeros(3, np.float32), "bfloat16")
    with pytest.raises(ValueError):
        from_wire(np.zeros(3, np.float16), "float32")
    with pytest.raises(ValueError):
        to_wire(torch.zeros(3), "int8")

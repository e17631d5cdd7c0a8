import numpy as np
import pytest
import torch

from libe_cnn import codec
from libe_cnn.wire import (
    INT8_CHUNK,
    ErrorFeedback,
    ParameterCopy,
    dequantize_int8,
    from_wire,
    quantize_int8,
    receive_parameters,
    to_wire,
)


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
        to_wire(torch.zeros(3), "int4")


def test_int8_quarters_the_bytes_and_rounds_each_value_to_half_its_chunks_step():
    values = np.random.default_rng(0).standard_normal(3 * INT8_CHUNK + 5).astype(np.float32) * 3
    sent = to_wire(torch.from_numpy(values), "int8")
    chunks = 4
    assert sent.dtype == np.uint8 and sent.nbytes == 4 + 4 * chunks + len(values)  # count, scales, a byte each
    back = from_wire(codec.decode(codec.encode(sent)), "int8")
    assert back.dtype == np.float32 and back.shape == values.shape
    padded = np.concatenate([values, np.zeros(chunks * INT8_CHUNK - len(values), np.float32)])
    steps = np.repeat(np.abs(padded.reshape(chunks, -1)).max(axis=1) / 127, INT8_CHUNK)[: len(values)]
    assert np.all(np.abs(back - values) <= steps / 2 * (1 + 1e-6))
    assert np.abs(back).max() == pytest.approx(np.abs(values).max())  # the largest value is exact


def test_int8_keeps_zeros_and_non_finite_values_visible():
    assert np.array_equal(dequantize_int8(quantize_int8(np.zeros(7, np.float32))), np.zeros(7))
    back = dequantize_int8(quantize_int8(np.array([1.0, np.nan, 2.0], np.float32)))
    assert not np.isfinite(back).all()  # the generator's screening still sees it
    assert dequantize_int8(quantize_int8(np.zeros(0, np.float32))).shape == (0,)


def test_malformed_int8_is_refused():
    packed = quantize_int8(np.ones(10, np.float32))
    with pytest.raises(ValueError, match="do not hold 10 values"):
        dequantize_int8(packed[:-1])
    with pytest.raises(ValueError, match="not a packed int8 array"):
        dequantize_int8(packed[:2])
    with pytest.raises(ValueError, match="int8 on the wire, got float16"):
        from_wire(np.ones(3, np.float16), "int8")


def test_error_feedback_carries_the_rounding_into_the_next_sends():
    rng = np.random.default_rng(1)
    feedback, total_sent, total_true = ErrorFeedback(2000), np.zeros(2000), np.zeros(2000)
    for step in range(50):
        values = rng.standard_normal(2000).astype(np.float32)
        total_true += values
        total_sent += dequantize_int8(feedback.encode(0, 2000, values, exact=False))
    # What was lost is still owed, never more than one send's rounding: the sums agree to it.
    np.testing.assert_allclose(total_sent + feedback.residual, total_true, atol=1e-4)
    assert np.abs(feedback.residual).max() < 0.05
    # Without feedback the errors of 50 sends add up.
    plain = sum(dequantize_int8(quantize_int8(v)) - v for v in
                (np.random.default_rng(1).standard_normal(2000).astype(np.float32) for _ in range(50)))
    assert np.abs(plain).max() > 3 * np.abs(feedback.residual).max()
    whole = feedback.encode(0, 2000, np.ones(2000, np.float32), exact=True)
    assert whole.dtype == np.float32 and not feedback.residual.any()  # an exact send spends what was owed


def test_workers_hold_the_generators_copy_of_the_parameters_bit_for_bit():
    rng = np.random.default_rng(2)
    params = rng.standard_normal(1500).astype(np.float32)
    copy, held = ParameterCopy(1500), np.empty(1500, np.float32)
    for step in range(20):
        for start, stop in ((0, 700), (700, 1500)):  # two buckets
            receive_parameters(held[start:stop], copy.encode(start, stop, params[start:stop], exact=step == 0), "int8")
        assert np.array_equal(held, copy.held)
        assert np.abs(held - params).max() < 0.02  # within one change's rounding of the parent
        params += 0.01 * rng.standard_normal(1500).astype(np.float32)
    receive_parameters(held, copy.encode(0, 1500, params, exact=True), "int8")
    assert np.array_equal(held, params)

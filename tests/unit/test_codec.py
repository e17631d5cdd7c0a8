import struct

import numpy as np
import pytest

from libe_cnn import codec


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "uint8", "int16"])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 1, 5)])
def test_round_trip(dtype, shape):
    a = (np.arange(int(np.prod(shape))) * 3 % 11).astype(dtype).reshape(shape)
    b = codec.decode(codec.encode(a))
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_big_endian_input_is_stored_little_endian():
    a = np.arange(5, dtype=">f4")
    np.testing.assert_array_equal(codec.decode(codec.encode(a)), a)


def test_decoded_array_is_a_view_not_a_copy():
    data = codec.encode(np.ones(1000, np.float32))
    decoded = codec.decode(data)
    data[-4:] = np.float32(7.0).tobytes()
    assert decoded[-1] == 7.0
    assert not codec.decode(bytes(data)).flags.writeable  # what Redis returns stays read-only


def test_rejects_unsupported_dtype():
    with pytest.raises(codec.CodecError, match="not supported"):
        codec.encode(np.array(["a"], dtype=object))


def _header(magic=b"LCNT", version=1, code=1, ndim=1, shape=(4,)):
    return struct.pack("<4sBBBB", magic, version, code, ndim, 0) + b"".join(struct.pack("<Q", n) for n in shape)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "too short"),
        (_header(magic=b"\x80\x04\x95\x00") + bytes(16), "bad magic"),
        (_header(version=9) + bytes(16), "version"),
        (_header(code=99) + bytes(16), "allow-list"),
        (_header(ndim=200, shape=()), "exceeds"),
        (_header(ndim=3, shape=(4,)), "truncated"),
        (_header() + bytes(15), "needs 16"),
        (_header() + bytes(17), "needs 16"),
    ],
)
def test_rejects_malformed(data, message):
    with pytest.raises(codec.CodecError, match=message):
        codec.decode(data)


def test_rejects_pickle_payload():
    import pickle

    with pytest.raises(codec.CodecError):
        codec.decode(pickle.dumps(np.ones(3)))

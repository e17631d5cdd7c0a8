"""Raw tensor codec: a small fixed header followed by the array's bytes.

Tensors travel through Redis in this format instead of pickle, so that whoever can
write to the store cannot make a worker run code, and so that decoding is a view over
the received bytes rather than a copy.

Layout (little endian):
    magic "LCNT" | version u8 | dtype code u8 | ndim u8 | reserved u8 | shape u64 * ndim | data
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"LCNT"
VERSION = 1
_PREFIX = struct.Struct("<4sBBBB")
_DIM = struct.Struct("<Q")
MAX_NDIM = 8

# Allow-list of element types; anything else is refused on both ends.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("<f8"),
    4: np.dtype("<i8"),
    5: np.dtype("u1"),
    6: np.dtype("<i2"),  # also carries bfloat16 bit patterns (see libe_cnn.wire)
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


class CodecError(ValueError):
    """Raised for bytes that are not a well-formed encoded tensor."""


def encode(array: np.ndarray) -> bytearray:
    """Encode a numeric array as header + raw bytes (C order), copying the data once."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _CODE_OF.get(np.dtype(dtype))
    if code is None:
        raise CodecError(f"dtype {array.dtype} is not supported by the tensor codec")
    if array.ndim > MAX_NDIM:
        raise CodecError(f"arrays of more than {MAX_NDIM} dimensions are not supported")
    header = _PREFIX.pack(MAGIC, VERSION, code, array.ndim, 0)
    header += b"".join(_DIM.pack(n) for n in array.shape)
    out = bytearray(len(header) + array.size * dtype.itemsize)
    out[: len(header)] = header
    payload = np.frombuffer(out, dtype=dtype, count=array.size, offset=len(header))
    payload[...] = array.reshape(-1)
    return out


def decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode bytes made by `encode` into a read-only array viewing `data`.

    Raises:
        CodecError: if the header is malformed or disagrees with the payload length.
    """
    if len(data) < _PREFIX.size:
        raise CodecError(f"encoded tensor too short ({len(data)} bytes)")
    magic, version, code, ndim, _ = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise CodecError("not an encoded tensor (bad magic)")
    if version != VERSION:
        raise CodecError(f"unsupported tensor codec version {version}")
    dtype = DTYPE_CODES.get(code)
    if dtype is None:
        raise CodecError(f"dtype code {code} is not on the allow-list")
    if ndim > MAX_NDIM:
        raise CodecError(f"ndim {ndim} exceeds {MAX_NDIM}")
    offset = _PREFIX.size + ndim * _DIM.size
    if len(data) < offset:
        raise CodecError("encoded tensor header is truncated")
    shape = tuple(_DIM.unpack_from(data, _PREFIX.size + i * _DIM.size)[0] for i in range(ndim))
    count = int(np.prod(shape, dtype=np.uint64)) if shape else 1
    if len(data) - offset != count * dtype.itemsize:
        raise CodecError(
            f"payload is {len(data) - offset} bytes but shape {shape} of {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)

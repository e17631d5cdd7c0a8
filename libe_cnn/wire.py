"""The element type of tensors on the wire: float32, 16-bit to halve the bytes moved, or int8
with error feedback to quarter them.

The parent model and its optimizer always keep float32; only what travels is rounded.
numpy has no bfloat16, so bfloat16 travels as its raw 16 bits (int16) and is widened here.

int8 (sync): values travel as one byte each with a float32 scale per INT8_CHUNK of them
(symmetric: scale = max |x| / 127), packed into one uint8 array (INT8_LAYOUT). Rounding
errors are not lost but carried (error feedback, Seide et al. 2014; Karimireddy et al.
2019): each worker adds what its last gradients lost into its next ones (ErrorFeedback),
and the generator sends each bucket of parameters as the change from what the workers
hold, keeping their copy (ParameterCopy), so that the workers' parameters never drift from
the parent by more than one step's rounding. At the run's first step and at checkpoint steps
both directions travel in float32 and carry nothing over, so a resumed run continues as the
uninterrupted one would, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

INT8_CHUNK = 1024  # values per scale: 0.4% of the bytes in scales
# uint32 value count | float32 scale per chunk | int8 values, little endian
_COUNT = np.dtype("<u4")
_SCALE = np.dtype("<f4")


def to_wire(flat: torch.Tensor, wire: str) -> np.ndarray:
    """A host array of `flat` in the wire type (a view, not a copy, for float32 on CPU)."""
    flat = flat.detach()
    if wire == "float32":
        return flat.cpu().numpy()
    if wire == "float16":
        return flat.to(torch.float16).cpu().numpy()
    if wire == "bfloat16":
        return flat.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    if wire == "int8":
        return quantize_int8(flat.cpu().numpy())
    raise ValueError(f"unknown wire dtype {wire!r}")


def from_wire(array: np.ndarray, wire: str) -> np.ndarray:
    """The float32 values of an array received in the wire type (int8 runs also send float32)."""
    if wire == "bfloat16":
        if array.dtype != np.int16:
            raise ValueError(f"bfloat16 travels as int16, got {array.dtype}")
        # bfloat16 is the upper half of a float32: shift its bits back into place.
        return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if wire == "int8" and array.dtype == np.uint8:
        return dequantize_int8(array)
    expected = np.float32 if wire in ("float32", "int8") else np.float16
    if array.dtype != expected:
        raise ValueError(f"{wire} on the wire, got {array.dtype}")
    return array.astype(np.float32, copy=False)


def quantize_int8(values: np.ndarray) -> np.ndarray:
    """float32 values as INT8_LAYOUT bytes: one int8 each, a scale per chunk."""
    values = np.asarray(values, np.float32)
    n = len(values)
    chunks = -(-n // INT8_CHUNK)
    padded = np.zeros(chunks * INT8_CHUNK, np.float32)
    padded[:n] = values
    padded = padded.reshape(chunks, INT8_CHUNK)
    scales = (np.abs(padded).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        # A zero chunk has scale 0 (all zeros); NaN or inf make the scale, hence the chunk, non-finite.
        q = np.where(scales[:, None] > 0, np.rint(padded / scales[:, None]), 0)
    q = np.clip(np.nan_to_num(q), -127, 127).astype(np.int8).reshape(-1)[:n]
    out = np.empty(_COUNT.itemsize + chunks * _SCALE.itemsize + n, np.uint8)
    out[: _COUNT.itemsize] = np.array([n], _COUNT).view(np.uint8)
    out[_COUNT.itemsize : _COUNT.itemsize + chunks * _SCALE.itemsize] = scales.astype(_SCALE).view(np.uint8)
    out[_COUNT.itemsize + chunks * _SCALE.itemsize :] = q.view(np.uint8)
    return out


def dequantize_int8(packed: np.ndarray) -> np.ndarray:
    """The float32 values of INT8_LAYOUT bytes."""
    if packed.dtype != np.uint8 or len(packed) < _COUNT.itemsize:
        raise ValueError("int8 on the wire: not a packed int8 array")
    n = int(packed[: _COUNT.itemsize].view(_COUNT)[0])
    chunks = -(-n // INT8_CHUNK)
    body = _COUNT.itemsize + chunks * _SCALE.itemsize
    if len(packed) != body + n:
        raise ValueError(f"int8 on the wire: {len(packed)} bytes do not hold {n} values")
    scales = packed[_COUNT.itemsize : body].view(_SCALE).astype(np.float32)
    q = packed[body:].view(np.int8).astype(np.float32)
    return q * np.repeat(scales, INT8_CHUNK)[:n]


class ErrorFeedback:
    """A worker's rounding residual: what its int8 gradients lost, added to the next ones."""

    def __init__(self, size: int) -> None:
        self.residual = np.zeros(size, np.float32)

    def encode(self, start: int, stop: int, values: np.ndarray, exact: bool) -> np.ndarray:
        """Values [start, stop) plus their residual, as int8 (the residual keeps the rounding
        error), or float32 when `exact` (the residual is then spent)."""
        carried = values + self.residual[start:stop]
        if exact:
            self.residual[start:stop] = 0
            return carried
        packed = quantize_int8(carried)
        self.residual[start:stop] = carried - dequantize_int8(packed)
        return packed


class ParameterCopy:
    """The generator's copy of the parameters the workers hold under int8: each bucket goes as
    the int8 change from it, which the workers add to theirs, or whole in float32 when `exact`."""

    def __init__(self, size: int) -> None:
        self.held = np.zeros(size, np.float32)
        self.sent_any = False  # until then the workers hold nothing of it

    def encode(self, start: int, stop: int, params: np.ndarray, exact: bool) -> np.ndarray:
        held = self.held[start:stop]
        self.sent_any = True
        if exact:
            held[:] = params
            return held.copy()
        packed = quantize_int8(params - held)
        held += dequantize_int8(packed)
        return packed


def receive_parameters(held: np.ndarray, array: np.ndarray, wire: str) -> None:
    """A worker's side of the parameters' wire: whole values replace `held`; int8 changes add to it."""
    if wire == "int8" and array.dtype == np.uint8:
        held += dequantize_int8(array)
    else:
        held[:] = from_wire(array, wire)

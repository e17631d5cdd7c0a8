"""The element type of tensors on the wire: float32, or 16-bit to halve the bytes moved.

The parent model and its optimizer always keep float32; only what travels is rounded.
numpy has no bfloat16, so bfloat16 travels as its raw 16 bits (int16) and is widened here.
"""

from __future__ import annotations

import numpy as np
import torch


def to_wire(flat: torch.Tensor, wire: str) -> np.ndarray:
    """A host array of `flat` in the wire type (a view, not a copy, for float32 on CPU)."""
    flat = flat.detach()
    if wire == "float32":
        return flat.cpu().numpy()
    if wire == "float16":
        return flat.to(torch.float16).cpu().numpy()
    if wire == "bfloat16":
        return flat.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    raise ValueError(f"unknown wire dtype {wire!r}")


def from_wire(array: np.ndarray, wire: str) -> np.ndarray:
    """The float32 values of an array received in the wire type."""
    if wire == "bfloat16":
        if array.dtype != np.int16:
            raise ValueError(f"bfloat16 travels as int16, got {array.dtype}")
        # bfloat16 is the upper half of a float32: shift its bits back into place.
        return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    expected = np.float32 if wire == "float32" else np.float16
    if array.dtype != expected:
        raise ValueError(f"{wire} on the wire, got {array.dtype}")
    return array.astype(np.float32, copy=False)

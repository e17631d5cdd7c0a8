"""The arithmetic every reduction shares: a fixed-order sum and a finiteness check.

It lives apart from the strategies so that the exchange (libe_cnn/stream.py), the generator
and the simulators can use it without importing the strategy registry.
"""

from __future__ import annotations

import numpy as np


def finite(buffer: np.ndarray) -> bool:
    # NaN propagates through min and max, and inf shows in one of them: two passes, no copy.
    return bool(np.isfinite(buffer.min()) and np.isfinite(buffer.max()))


def reduce_in_order(buffers, out: np.ndarray, mode: str = "sum") -> np.ndarray:
    """Sum (or average) flat float32 buffers into the preallocated `out`, in the given order.

    A fixed order makes a run reproducible bit for bit.
    """
    if not buffers:
        raise ValueError("nothing to combine")
    for b in buffers:
        if b.shape != out.shape:
            raise ValueError(f"buffer of shape {b.shape} does not match {out.shape}")
    if len(buffers) == 1:
        np.copyto(out, buffers[0])
    else:  # the first addition reads both buffers: one pass fewer than copying the first
        np.add(buffers[0], buffers[1], out=out)
    for b in buffers[2:]:
        np.add(out, b, out=out)
    if mode == "mean":
        out *= np.float32(1.0 / len(buffers))
    elif mode != "sum":
        raise ValueError(f"unknown reduction {mode!r}")
    return out


def reduce_is_finite(buffers, out: np.ndarray, mode: str = "sum") -> bool:
    """reduce_in_order, then whether the result is finite.

    One pass: a NaN or inf in any buffer makes the sum NaN or inf (so may an overflow), so
    each buffer needs looking at only when this says no.
    """
    return bool(np.isfinite(reduce_in_order(buffers, out, mode).sum()))

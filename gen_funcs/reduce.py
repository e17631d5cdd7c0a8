"""How the generator combines the workers' gradients (pure functions, no messaging)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def reduce_gradients(grads: Sequence[np.ndarray], out: np.ndarray, mode: str = "sum") -> np.ndarray:
    """Sum (or average) flat gradient buffers into the preallocated `out`, in the given order.

    The order is fixed by the caller (by shard) so that a run is reproducible bit for bit.
    """
    if not grads:
        raise ValueError("no gradients to reduce")
    for g in grads:
        if g.shape != out.shape:
            raise ValueError(f"gradient of shape {g.shape} does not match {out.shape}")
    np.copyto(out, grads[0])
    for g in grads[1:]:
        np.add(out, g, out=out)
    if mode == "mean":
        out *= np.float32(1.0 / len(grads))
    elif mode != "sum":
        raise ValueError(f"unknown reduction {mode!r}")
    return out

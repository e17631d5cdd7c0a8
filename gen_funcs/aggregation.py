"""How workers' results are combined, one pure function per rule (no messaging, no torch).

All buffers are flat float32 arrays of one model's parameters or gradients. Every function
works in a caller-fixed order, so that a run is reproducible bit for bit.

    sync                 reduce_gradients            (parallel SGD; the all-reduce of DDP)
    async                staleness_weight            (Hogwild-style parameter server)
    param-avg            average_parameters          (model averaging / local SGD)
    weighted-param-avg   average_parameters, mix_parameters
    easgd                elastic_pull, elastic_center_update   (Zhang, Choromanska, LeCun 2015)
    gossip               gossip_pairing, pairwise_average      (decentralized averaging)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_shapes(buffers: Sequence[np.ndarray], out: np.ndarray) -> None:
    if not buffers:
        raise ValueError("nothing to combine")
    for b in buffers:
        if b.shape != out.shape:
            raise ValueError(f"buffer of shape {b.shape} does not match {out.shape}")


def reduce_gradients(grads: Sequence[np.ndarray], out: np.ndarray, mode: str = "sum") -> np.ndarray:
    """Sum (or average) flat gradient buffers into the preallocated `out`, in the given order."""
    _check_shapes(grads, out)
    np.copyto(out, grads[0])
    for g in grads[1:]:
        np.add(out, g, out=out)
    if mode == "mean":
        out *= np.float32(1.0 / len(grads))
    elif mode != "sum":
        raise ValueError(f"unknown reduction {mode!r}")
    return out


def average_parameters(params: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """The workers' mean model, written into `out`."""
    return reduce_gradients(params, out, "mean")


def mix_parameters(parent: np.ndarray, workers_mean: np.ndarray, mix_lambda: float) -> np.ndarray:
    """parent <- (1 - lambda) * parent + lambda * mean(workers), in place."""
    parent += np.float32(mix_lambda) * (workers_mean - parent)
    return parent


def elastic_pull(worker: np.ndarray, center: np.ndarray, alpha: float) -> np.ndarray:
    """A worker's EASGD step toward the center: x_i <- x_i - alpha (x_i - center), in place."""
    worker -= np.float32(alpha) * (worker - center)
    return worker


def elastic_center_update(center: np.ndarray, workers: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """The center's EASGD step: center <- center + alpha * sum_i (x_i - center), in place.

    Computed from the same worker values as each worker's `elastic_pull`, so the pulls are
    symmetric and center + sum(workers) is unchanged by one exchange.
    """
    _check_shapes(workers, center)
    pull = np.zeros_like(center)
    for w in workers:
        pull += w - center
    center += np.float32(alpha) * pull
    return center


def gossip_pairing(n: int, round_index: int, seed: int, topology: str) -> np.ndarray:
    """Who averages with whom in one gossip round: peer[i] = j and peer[j] = i, or -1 for none.

    Pairs form a matching, so every exchange is symmetric and the workers' mean is preserved.
    `random` draws a fresh matching per round from (seed, round); `ring` pairs neighbours,
    alternating between even and odd edges so that information travels around the ring.
    With odd N one worker sits each round out.
    """
    peer = np.full(n, -1, dtype=np.int64)
    if topology == "random":
        order = np.random.default_rng([seed, round_index]).permutation(n)
        pairs = zip(order[0::2], order[1::2])
    elif topology == "ring":
        first = round_index % 2
        pairs = [(i, (i + 1) % n) for i in range(first, n - 1 + (n % 2 == 0), 2)] if n > 1 else []
    else:
        raise ValueError(f"unknown gossip topology {topology!r}")
    for i, j in pairs:
        peer[i], peer[j] = j, i
    return peer


def pairwise_average(own: np.ndarray, peer: np.ndarray) -> np.ndarray:
    """One gossip exchange on a worker: own <- (own + peer) / 2, in place."""
    own += peer
    own *= np.float32(0.5)
    return own


def staleness_weight(staleness: int, max_staleness: int | None) -> float:
    """Weight of an asynchronous gradient computed `staleness` updates ago: 1, or 0 to drop it.

    Dropping (rather than down-weighting) keeps the optimizer's step size meaningful: a
    gradient either counts fully or not at all, and the drops are counted in the metrics.
    """
    if staleness < 0:
        raise ValueError(f"negative staleness {staleness}")
    return 1.0 if max_staleness is None or staleness <= max_staleness else 0.0

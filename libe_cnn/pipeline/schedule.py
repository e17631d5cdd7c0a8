"""The order in which a pipeline stage runs its micro-batches' forwards and backwards.

GPipe (Huang et al. 2019): every forward, then every backward. 1F1B (PipeDream-Flush,
Narayanan et al. 2021): stage s runs K - 1 - s forwards ahead, then alternates one forward and
one backward, then drains the backwards; it keeps at most K - s micro-batches' activations
where GPipe keeps all M. Both leave each stage idle for (K - 1) / (M + K - 1) of a step when
the stages take equal time (the bubble).
"""

from __future__ import annotations

from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b")


class Op(NamedTuple):
    forward: bool  # False: the backward
    microbatch: int

    def __repr__(self) -> str:
        return f"{'F' if self.forward else 'B'}{self.microbatch}"


def schedule(stage: int, n_stages: int, n_microbatches: int, kind: str) -> list[Op]:
    """Stage `stage`'s operations of one step, in order (micro-batches numbered from 0).

    Forwards and backwards each go in micro-batch order, so that a stage receives its
    neighbours' activations and gradients in the order it needs them.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r} (one of {', '.join(SCHEDULES)})")
    if not (0 <= stage < n_stages and n_microbatches >= 1):
        raise ValueError(f"no stage {stage} of {n_stages} with {n_microbatches} micro-batches")
    m = n_microbatches
    if kind == "gpipe":
        return [Op(True, i) for i in range(m)] + [Op(False, i) for i in range(m)]
    ahead = min(n_stages - 1 - stage, m)
    ops = [Op(True, i) for i in range(ahead)]
    for i in range(m - ahead):
        ops += [Op(True, ahead + i), Op(False, i)]
    return ops + [Op(False, i) for i in range(m - ahead, m)]


def peak_stash(ops: list[Op]) -> int:
    """The most micro-batches whose activations the stage holds at once (forward done, backward not)."""
    held = peak = 0
    for op in ops:
        held += 1 if op.forward else -1
        peak = max(peak, held)
    return peak


def bubble_fraction(n_stages: int, n_microbatches: int) -> float:
    """The idle fraction of each stage in theory, with stages of equal time and free transfers."""
    return (n_stages - 1) / (n_microbatches + n_stages - 1)

"""The generator's side of sync's streamed exchange (libe_cnn/stream.py has the names, the
layout and the workers' side): wait for a step's gradient buckets, reduce them into the
parent's gradient in shard order, and publish the new parameters bucket by bucket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from libe_cnn.buckets import Bucket
from libe_cnn.reduction import reduce_in_order
from libe_cnn.store import ServerGroup, TensorStore
from libe_cnn.stream import (
    GRAD_ARRIVALS,
    GRAD_REDUCED,
    Layout,
    grad_name,
    params_name,
    params_ready,
    parse_grad_token,
    parse_reduced_token,
    reduced_name,
)
from libe_cnn.wire import from_wire


@dataclass(frozen=True)
class Senders:
    """Whose copies of each bucket the generator reduces: every worker's of every bucket
    (data parallelism, stages=1), or with a pipeline, each replica's worker of the bucket's stage."""

    copies: int  # copies of each bucket, one per data shard
    stages: int = 1

    def worker(self, shard: int, bucket: int) -> int:
        """The worker that sends shard `shard`'s copy of bucket `bucket` (bucket 0 is the last stage's)."""
        return shard if self.stages == 1 else shard * self.stages + self.stages - 1 - bucket

    def readers(self, bucket: int) -> list[int]:
        """The workers that load bucket `bucket` of the parameters."""
        return [self.worker(s, bucket) for s in range(self.copies)]


@dataclass
class StepGradients:
    """One step's gradients, reduced into the parent's gradient buffer."""

    good: list[int]  # the shards whose gradient counted
    losses: list[float]  # each worker's training loss, in shard order
    wait_s: float = 0.0  # blocked waiting for buckets
    fetch_s: float = 0.0
    reduce_s: float = 0.0
    last_arrival: float = 0.0  # when the step's last bucket arrived
    keys: list[tuple[TensorStore, str]] = field(default_factory=list)  # what the step left in the store

    def wait(self, run, queue: str) -> tuple[list[str] | None, float]:
        """The next tokens of `queue`, and when they came; None if the manager stops the run meanwhile.

        The step's keys then stay until the run's end deletes them all: a worker's chunk reducer
        may still be reading the gradients, and would fail on a key taken from under it."""
        t0 = time.perf_counter()
        tokens = run.messages.next_tokens(queue)
        t1 = time.perf_counter()
        self.wait_s += t1 - t0
        return tokens, t1


def step_keys(servers: ServerGroup, layout: Layout, step: int) -> list[tuple[TensorStore, str]]:
    """ring: what a step leaves in the store, every worker's chunks and the reduced ones, by server."""
    n, key = layout.n_chunks, servers.stores[0].key
    return ([(servers.home(s), key(grad_name(step, s, b.index, c))) for b in layout.buckets for s in range(n)
             for c in range(n)]
            + [(servers.home(c), key(reduced_name(step, b.index, c))) for b in layout.buckets for c in range(n)])


def read_reduced(servers: ServerGroup, layout: Layout, step: int, tokens: list[str], pending: set[tuple[int, int]],
                 write: Callable[[int, int, np.ndarray], None]) -> tuple[set[int], list[float]]:
    """The reduced chunks that `tokens` announce, each handed to write(start, stop, array) and
    taken out of `pending` (bucket, chunk) pairs of `step`; returns the workers they name
    non-finite, and the workers' losses."""
    arrived = [parse_reduced_token(t) for t in tokens]
    bad: set[int] = set()
    losses: list[float] = []
    for sent_at, index, chunk, nonfinite, losses in arrived:
        if sent_at != step or (index, chunk) not in pending:
            raise RuntimeError(f"unexpected reduced chunk {chunk} of bucket {index} of step {sent_at} "
                               f"during step {step}")
        pending.remove((index, chunk))
        bad.update(nonfinite)
    arrays = servers.get_many([(chunk, reduced_name(step, index, chunk)) for _, index, chunk, _, _ in arrived])
    for (_, index, chunk, _, _), array in zip(arrived, arrays):
        write(*layout.chunks(index)[chunk], array)
    return bad, losses


def reduce_step(run, step: int, layout: Layout, senders: Senders) -> StepGradients | None:
    """Wait for `step`'s gradients and reduce them into the parent's gradient, bucket by
    bucket; None if the manager stops the run meanwhile."""
    return _reduce_reduced(run, step, layout) if layout.ring else _reduce_copies(run, step, layout, senders)


def _reduce_copies(run, step: int, layout: Layout, senders: Senders) -> StepGradients | None:
    """star: reduce each bucket once all its copies are there (one per shard, in shard order).

    A worker with a non-finite bucket is left out of every bucket (--on-nonfinite skip), so
    buckets reduced before that was known are reduced again without it: the math is that of
    reducing whole gradients.
    """
    n, parent, mode = senders.copies, run.parent, run.cfg.reduce
    buckets = layout.buckets
    copies: list[dict[int, np.ndarray]] = [{} for _ in buckets]
    losses: dict[int, float] = {}
    bad: set[int] = set()
    reduced_over: dict[int, list[int]] = {}
    got = StepGradients([], [])
    while any(len(c) < n for c in copies):
        tokens, t1 = got.wait(run, GRAD_ARRIVALS)
        if tokens is None:
            return None
        arrived = [parse_grad_token(t) for t in tokens]
        for sent_at, shard, index, _ in arrived:
            if sent_at != step or not 0 <= index < len(buckets) or shard in copies[index]:
                raise RuntimeError(f"unexpected gradient bucket {index} of step {sent_at} from shard {shard + 1} "
                                   f"during step {step}")
        names = [(shard, grad_name(step, shard, index, 0)) for _, shard, index, _ in arrived]
        got.keys += [(run.servers.home(shard), run.store.key(name)) for shard, name in names]
        arrays = run.servers.get_many(names)
        t2 = time.perf_counter()
        got.fetch_s += t2 - t1
        for (_, shard, index, loss), array in zip(arrived, arrays):
            copies[index][shard] = from_wire(array, run.cfg.wire_dtype)
            if index == 0:  # the last layers' bucket: in a pipeline, the stage that computed the loss
                losses[shard] = loss
            if len(copies[index]) == n:
                got.last_arrival = t1
                good = [s for s in range(n) if s not in bad]
                # A NaN or inf in any copy makes the reduced bucket non-finite: only then look at each copy.
                if good and not parent.reduce_bucket(buckets[index], [copies[index][s] for s in good], mode):
                    ordered = [copies[index][s] for s in range(n)]
                    bad.update(run.screen(ordered, [senders.worker(s, index) for s in range(n)], step + 1,
                                          "gradient"))
                if good:
                    reduced_over[index] = good
        got.reduce_s += time.perf_counter() - t2
    t3 = time.perf_counter()
    got.good = [s for s in range(n) if s not in bad]
    for index, shards in reduced_over.items():
        if shards != got.good and got.good:
            parent.reduce_bucket(buckets[index], [copies[index][s] for s in got.good], mode)
    got.reduce_s += time.perf_counter() - t3
    got.losses = [losses[s] for s in range(n)]
    return got


def _reduce_reduced(run, step: int, layout: Layout) -> StepGradients | None:
    """ring: read each bucket's N reduced chunks (one model's worth in all) into the parent's gradient.

    The workers name whoever sent NaN or inf; the rare step with one is reduced here again
    from the gradients the workers left in the store, without them (--on-nonfinite skip).
    """
    n, parent = run.n, run.parent
    pending = {(b.index, c) for b in layout.buckets for c in range(n)}
    bad: set[int] = set()
    got = StepGradients([], [], keys=step_keys(run.servers, layout, step))
    while pending:
        tokens, t1 = got.wait(run, GRAD_REDUCED)
        if tokens is None:
            return None
        nonfinite, got.losses = read_reduced(run.servers, layout, step, tokens, pending,
                                             lambda start, stop, array: np.copyto(parent.host_grad[start:stop], array))
        bad.update(nonfinite)
        got.last_arrival = t1
        got.fetch_s += time.perf_counter() - t1
    t2 = time.perf_counter()
    run.messages.nonfinite(sorted(bad), step + 1, "gradient")
    got.good = [s for s in range(n) if s not in bad]
    if bad and got.good:
        for b in layout.buckets:
            for chunk, (start, stop) in enumerate(layout.chunks(b.index)):
                copies = [from_wire(a, run.cfg.wire_dtype) for a in
                          run.servers.get_many([(s, grad_name(step, s, b.index, chunk)) for s in got.good])]
                reduce_in_order(copies, parent.host_grad[start:stop], run.cfg.reduce)
    got.reduce_s = time.perf_counter() - t2
    return got


def publish(run, layout: Layout, senders: Senders, version: int, bucket: Bucket, exact: bool = True) -> None:
    """Put one bucket of the parent's parameters (chunk by chunk, each on its owner's server)
    and tell the workers that load it that it is there (`exact`: whole, even on an int8 wire)."""
    run.servers.put_many([(chunk, params_name(version, bucket.index, chunk),
                           run.parent.slice_for_wire(start, stop, exact))
                          for chunk, (start, stop) in enumerate(layout.chunks(bucket.index))])
    run.store.notify([params_ready(s) for s in senders.readers(bucket.index)], f"{version} {bucket.index}")


class Publisher:
    """Publishes each bucket of the new parameters as soon as it is stepped (the workers wait for it).

    An error is kept until the whole step is taken, so that the run keeps that step.
    """

    def __init__(self, run, layout: Layout, senders: Senders, version: int | None) -> None:
        self.run, self.layout, self.senders = run, layout, senders
        self.version = version  # None: the last step, nothing to publish
        self.seconds = 0.0
        self.first_at: float | None = None  # when the first bucket was out: what the workers wait for
        self.error: Exception | None = None

    def __call__(self, bucket) -> None:
        if self.version is None or self.error is not None:
            return
        t0 = time.perf_counter()
        try:
            # int8: whole at checkpoints, so that a run resumed there gets what this one sends.
            publish(self.run, self.layout, self.senders, self.version, bucket, self.run.plan.checkpoint_at(self.version))
        except Exception as e:  # noqa: BLE001 - raised by raise_error once the step is complete
            self.error = e
        self.seconds += time.perf_counter() - t0
        if self.first_at is None:
            self.first_at = time.perf_counter()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def params_keys(run, layout: Layout, version: int) -> list[tuple[TensorStore, str]]:
    """Where the parameters of `version` are in the store."""
    return [(run.servers.home(c), run.store.key(params_name(version, b.index, c)))
            for b in layout.buckets for c in range(layout.n_chunks)]

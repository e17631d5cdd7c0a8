"""The streamed exchange of sync: gradients leave in buckets during backward, parameters arrive
in buckets during forward, so that the exchange runs beside the compute instead of after it.

A worker's backward finishes the last layers' gradients first; a background thread puts each
bucket (libe_cnn/buckets.py) the moment it is final and tells the generator. The generator
reduces every bucket as soon as all N copies are there, steps, and publishes the new
parameters bucket by bucket, the first layers' first. The worker's next forward waits, layer
by layer, only for the bucket that layer needs, while a second thread loads the rest.

Names in the store (run-scoped, like every key of the run):
    grad-{step}-{shard}-{bucket}   one worker's gradient bucket of a step, in the wire type
    params-{version}-{bucket}      the parent's parameters after `version` steps, one bucket
Queues (Redis lists of short tokens), so that nobody polls for a key:
    grad-arrivals                  "{step} {shard} {bucket} {loss}": to the generator
    params-ready-{shard}           "{version} {bucket}": to one worker
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn

from libe_cnn.buckets import Bucket, buckets_of_modules
from libe_cnn.flat import copy_into
from libe_cnn.store import TensorStore
from libe_cnn.wire import from_wire, to_wire


GRAD_ARRIVALS = "grad-arrivals"
# How often a wait looks up to see whether the run was stopped meanwhile.
POLL_S = 0.5

T = TypeVar("T")


def params_ready(shard: int) -> str:
    return f"params-ready-{shard}"


def grad_name(step: int, shard: int, bucket: int) -> str:
    return f"grad-{step}-{shard}-{bucket}"


def params_name(version: int, bucket: int) -> str:
    return f"params-{version}-{bucket}"


def grad_token(step: int, shard: int, bucket: int, loss: float) -> str:
    return f"{step} {shard} {bucket} {loss!r}"


def parse_grad_token(token: str) -> tuple[int, int, int, float]:
    step, shard, bucket, loss = token.split()
    return int(step), int(shard), int(bucket), float(loss)


def blocking(wait: Callable[[], T]) -> T:
    """Every wait of the exchange on another process of the run goes through here.

    The in-process test harness (tests/fake_ensemble.py) runs the generator and the
    simulators as threads that take turns, and replaces this to let the others run meanwhile.
    """
    return wait()


class Stopped(Exception):
    """The manager stopped the run while this process waited for the exchange."""


class GradientSender:
    """A worker's thread that puts each gradient bucket as soon as backward has finished it."""

    def __init__(self, store: TensorStore, shard: int, buckets: list[Bucket], flat_grad: torch.Tensor,
                 wire: str) -> None:
        self.store, self.shard, self.buckets, self.flat_grad, self.wire = store, shard, buckets, flat_grad, wire
        self.busy_s = 0.0  # time spent putting, beside the compute
        self.error: Exception | None = None
        self._work: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"gradient-sender-{shard}", daemon=True)
        self._thread.start()

    def submit(self, step: int, bucket: int, loss: float) -> None:
        self._work.put((step, bucket, loss))

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            step, index, loss = item
            t0 = time.perf_counter()
            try:
                if self.error is None:
                    b = self.buckets[index]
                    self.store.put(to_wire(self.flat_grad[b.start : b.stop], self.wire),
                                   grad_name(step, self.shard, index))
                    self.store.notify([GRAD_ARRIVALS], grad_token(step, self.shard, index, loss))
            except Exception as e:  # reported to the worker's own thread by flush
                self.error = e
            finally:
                self.busy_s += time.perf_counter() - t0
                self._work.task_done()

    def flush(self) -> None:
        """Wait until every bucket submitted is in the store (backward may then reuse the buffer)."""
        self._work.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(timeout=10)


class ParameterLoader:
    """A worker's thread that copies the parent's parameters into the model bucket by bucket,
    as the generator publishes them."""

    def __init__(self, store: TensorStore, shard: int, buckets: list[Bucket], flat_params: torch.Tensor,
                 wire: str) -> None:
        self.store, self.shard, self.buckets, self.flat_params, self.wire = store, shard, buckets, flat_params, wire
        self.busy_s = 0.0  # time spent fetching and copying, beside the compute
        self.error: Exception | None = None
        self.loaded = [threading.Event() for _ in buckets]
        self._versions: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"parameter-loader-{shard}", daemon=True)
        self._thread.start()

    def request(self, version: int) -> None:
        """Start loading the parameters of `version`: only once the model is done with the last ones."""
        for event in self.loaded:
            event.clear()
        self._versions.put(version)

    def _run(self) -> None:
        while (version := self._versions.get()) is not None:
            try:
                for _ in self.buckets:
                    token = None
                    while token is None:
                        if self._closed:
                            return
                        token = self.store.next_token(params_ready(self.shard), POLL_S)
                    t0 = time.perf_counter()
                    got_version, index = map(int, token.split())
                    if got_version != version:
                        raise RuntimeError(f"worker {self.shard + 1} expected parameters of version {version}, "
                                           f"the generator published {got_version}")
                    b = self.buckets[index]
                    array = from_wire(self.store.get(self.store.key(params_name(version, index))), self.wire)
                    copy_into(self.flat_params[b.start : b.stop], array)
                    self.busy_s += time.perf_counter() - t0
                    self.loaded[index].set()
            except Exception as e:  # reported to the worker's own thread by wait
                self.error = e
                for event in self.loaded:
                    event.set()
                return

    def wait(self, index: int, stopped: Callable[[], bool]) -> float:
        """Block until bucket `index` is loaded; returns the seconds waited. Raises Stopped."""
        event = self.loaded[index]
        t0 = time.perf_counter()
        while not event.is_set():
            if not blocking(lambda: event.wait(POLL_S)) and stopped():
                raise Stopped()
        if self.error is not None:
            raise self.error
        return time.perf_counter() - t0

    def close(self) -> None:
        self._closed = True
        self._versions.put(None)
        self._thread.join(timeout=10)


class StreamedModel:
    """Hooks a worker's model into the stream: each module's forward first waits for its own
    parameter bucket, and each gradient bucket is handed to the sender once backward finished it."""

    def __init__(self, model: nn.Module, buckets: list[Bucket], loader: ParameterLoader, sender: GradientSender,
                 stopped: Callable[[], bool]) -> None:
        self.buckets, self.loader, self.sender, self.stopped = buckets, loader, sender, stopped
        self.load_wait_s = 0.0  # blocked in forward waiting for parameters
        self.step, self.loss = 0, 0.0
        self._remaining = [len(b.params) for b in buckets]
        params = list(model.parameters())
        for b in buckets:
            for i in b.params:
                params[i].register_post_accumulate_grad_hook(self._finished_hook(b.index))
        for module, needed in buckets_of_modules(model, buckets).items():
            module.register_forward_pre_hook(self._wait_hook(needed))

    def _wait_hook(self, needed: tuple[int, ...]):
        def wait_for_parameters(module, args):
            for index in needed:
                self.load_wait_s += self.loader.wait(index, self.stopped)
        return wait_for_parameters

    def _finished_hook(self, index: int):
        def gradient_finished(param):
            self._remaining[index] -= 1
            if self._remaining[index] == 0:
                self.sender.submit(self.step, index, self.loss)
        return gradient_finished

    def begin(self, step: int) -> None:
        """Before forward of `step`: its parameters start to arrive."""
        self.step = step
        self._remaining = [len(b.params) for b in self.buckets]
        self.loader.request(step)

    def before_backward(self, loss: float) -> None:
        """Every bucket is loaded before backward reads the parameters (a layer whose forward
        never ran would otherwise still be loading)."""
        self.loss = loss
        for b in self.buckets:
            self.load_wait_s += self.loader.wait(b.index, self.stopped)


# --- the generator's side ---

@dataclass
class StepGradients:
    """One step's gradients, reduced into the parent's gradient buffer."""

    good: list[int]  # the shards whose gradient counted
    losses: list[float]  # each worker's training loss, in shard order
    wait_s: float = 0.0  # blocked waiting for buckets
    fetch_s: float = 0.0
    reduce_s: float = 0.0
    last_arrival: float = 0.0  # when the step's last bucket arrived
    keys: list[str] = field(default_factory=list)  # the buckets' keys in the store


def reduce_step(run, step: int) -> StepGradients | None:
    """Wait for every worker's gradient buckets of `step` and reduce each bucket once all N are
    there; None if the manager stops the run meanwhile.

    A worker with a non-finite bucket is left out of every bucket (--on-nonfinite skip), so
    buckets reduced before that was known are reduced again without it: the math is that of
    reducing whole gradients.
    """
    n, parent, mode = run.n, run.parent, run.cfg.reduce
    buckets = parent.buckets
    copies: list[dict[int, np.ndarray]] = [{} for _ in buckets]
    losses: dict[int, float] = {}
    bad: set[int] = set()
    reduced_over: dict[int, list[int]] = {}
    got = StepGradients([], [])
    while any(len(c) < n for c in copies):
        t0 = time.perf_counter()
        token = run.messages.next_token(GRAD_ARRIVALS)
        t1 = time.perf_counter()
        got.wait_s += t1 - t0
        if token is None:
            if got.keys:
                run.store.evict(got.keys)
            return None
        sent_at, shard, index, loss = parse_grad_token(token)
        if sent_at != step or not 0 <= index < len(buckets) or shard in copies[index]:
            raise RuntimeError(f"unexpected gradient bucket {index} of step {sent_at} from worker {shard + 1} "
                               f"during step {step}")
        key = run.store.key(grad_name(step, shard, index))
        got.keys.append(key)
        copies[index][shard] = run.fetch([key])[0]
        losses[shard] = loss
        t2 = time.perf_counter()
        got.fetch_s += t2 - t1
        if len(copies[index]) == n:
            got.last_arrival = t1
            good = [s for s in range(n) if s not in bad]
            # A NaN or inf in any copy makes the reduced bucket non-finite: only then look at each copy.
            if good and not parent.reduce_bucket(buckets[index], [copies[index][s] for s in good], mode):
                ordered = [copies[index][s] for s in range(n)]
                bad.update(run.screen(ordered, range(n), step + 1, "gradient"))
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


def publish(run, version: int, bucket) -> None:
    """Put one bucket of the parent's parameters and tell every worker it is there."""
    run.store.put(run.parent.bucket_for_wire(bucket), params_name(version, bucket.index))
    run.store.notify([params_ready(s) for s in range(run.n)], f"{version} {bucket.index}")


class Publisher:
    """Publishes each bucket of the new parameters as soon as it is stepped (the workers wait for it).

    An error is kept until the whole step is taken, so that the run keeps that step.
    """

    def __init__(self, run, version: int | None) -> None:
        self.run, self.version = run, version  # None: the last step, nothing to publish
        self.seconds = 0.0
        self.first_at: float | None = None  # when the first bucket was out: what the workers wait for
        self.error: Exception | None = None

    def __call__(self, bucket) -> None:
        if self.version is None or self.error is not None:
            return
        t0 = time.perf_counter()
        try:
            publish(self.run, self.version, bucket)
        except Exception as e:  # noqa: BLE001 - raised by raise_error once the step is complete
            self.error = e
        self.seconds += time.perf_counter() - t0
        if self.first_at is None:
            self.first_at = time.perf_counter()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def params_keys(run, version: int) -> list[str]:
    return [run.store.key(params_name(version, b.index)) for b in run.parent.buckets]

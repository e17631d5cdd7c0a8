"""The streamed exchange of sync: gradients leave in buckets during backward, parameters arrive
in buckets during forward, so that the exchange runs beside the compute instead of after it.

A worker's backward finishes the last layers' gradients first; a background thread puts each
bucket (libe_cnn/buckets.py) the moment it is final. The new parameters come back bucket by
bucket, the first layers' first; the worker's next forward waits, layer by layer, only for the
bucket that layer needs, while a second thread loads the rest.

Who reduces (--reduce-topology):
    star   every worker's whole bucket goes to the generator, which reduces the N copies;
    ring   reduce-scatter among the workers first: each bucket is cut into N chunks, worker c
           reduces chunk c of everyone's copies (a third thread), and the generator reads one
           reduced bucket in N pieces. Its work per step is then one model's worth, whatever N.
Both reduce in shard order, so they give the same bits.

With several store servers (--redis-servers) each piece lives on the home server of the worker
it belongs to (RunPlan.homes): gradient chunks on their sender's, reduced chunks
and parameter chunks on chunk c's owner's (star has one chunk: worker 1's home, the first server).

Names in the store (run-scoped, like every key of the run):
    grad-{step}-{shard}-{bucket}-{chunk}   one worker's gradient chunk of a step, in the wire type
    reduced-{step}-{bucket}-{chunk}        ring: the reduced chunk, float32
    params-{version}-{bucket}-{chunk}      the parent's parameters after `version` steps
Queues (Redis lists of short tokens on the first server), so that nobody polls for a key:
    grad-arrivals          star: "{step} {shard} {bucket} {loss}", to the generator
    chunks-for-{owner}     ring: the same, to the worker that reduces that chunk
    grad-reduced           ring: "{step} {bucket} {chunk} {bad shards} {losses}", to the generator
    reduced-for-{shard}    the same, to every worker (--strategy ring-allreduce: no generator in between)
    params-ready-{shard}   "{version} {bucket}": to one worker
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from libe_cnn.buckets import Bucket, buckets_of_modules, chunk_bounds
from libe_cnn.flat import copy_into, host_array
from libe_cnn.store import ServerGroup
from libe_cnn.reduction import finite, reduce_is_finite
from libe_cnn import waits
from libe_cnn.waits import POLL_S, Background, Stopped
from libe_cnn.wire import ErrorFeedback, from_wire, receive_parameters, to_wire


GRAD_ARRIVALS = "grad-arrivals"
GRAD_REDUCED = "grad-reduced"

def params_ready(shard: int) -> str:
    return f"params-ready-{shard}"


def chunks_for(owner: int) -> str:
    return f"chunks-for-{owner}"


def reduced_for(shard: int) -> str:
    return f"reduced-for-{shard}"


def grad_name(step: int, shard: int, bucket: int, chunk: int) -> str:
    return f"grad-{step}-{shard}-{bucket}-{chunk}"


def reduced_name(step: int, bucket: int, chunk: int) -> str:
    return f"reduced-{step}-{bucket}-{chunk}"


def params_name(version: int, bucket: int, chunk: int) -> str:
    return f"params-{version}-{bucket}-{chunk}"


def grad_token(step: int, shard: int, bucket: int, loss: float) -> str:
    return f"{step} {shard} {bucket} {loss!r}"


def parse_grad_token(token: str) -> tuple[int, int, int, float]:
    step, shard, bucket, loss = token.split()
    return int(step), int(shard), int(bucket), float(loss)


def reduced_token(step: int, bucket: int, chunk: int, bad: list[int], losses: list[float]) -> str:
    return f"{step} {bucket} {chunk} {','.join(map(str, bad)) or '-'} {','.join(map(repr, losses))}"


def parse_reduced_token(token: str) -> tuple[int, int, int, list[int], list[float]]:
    step, bucket, chunk, bad, losses = token.split()
    return (int(step), int(bucket), int(chunk), [] if bad == "-" else [int(b) for b in bad.split(",")],
            [float(x) for x in losses.split(",")])


@dataclass(frozen=True)
class Layout:
    """How a step's exchange is cut: the model's buckets, and each bucket into chunks (one per
    reducing worker with ring, a single one with star)."""

    buckets: list[Bucket]
    n_chunks: int

    def chunks(self, index: int) -> list[tuple[int, int]]:
        return chunk_bounds(self.buckets[index], self.n_chunks)

    @property
    def ring(self) -> bool:
        return self.n_chunks > 1


class GradientSender:
    """A worker's thread that puts each gradient bucket as soon as backward has finished it:
    to the generator whole (star), or cut into chunks, each to the worker that reduces it (ring)."""

    def __init__(self, servers: ServerGroup, shard: int, layout: Layout, flat_grad: torch.Tensor, wire: str,
                 exact: Callable[[int], bool] | None = None) -> None:
        """`exact(step)`: whether an int8 wire sends `step`'s gradient whole (float32)."""
        self.servers, self.shard, self.layout, self.flat_grad, self.wire = servers, shard, layout, flat_grad, wire
        self.exact = exact
        self.feedback = ErrorFeedback(flat_grad.numel()) if wire == "int8" else None
        self._thread = Background(f"gradient-sender-{shard}")

    @property
    def busy_s(self) -> float:
        """Time spent putting, beside the compute."""
        return self._thread.busy_s

    def submit(self, step: int, bucket: int, loss: float) -> None:
        self._thread.submit(lambda: self._put(step, bucket, loss))

    def _put(self, step: int, index: int, loss: float) -> None:
        chunks = self.layout.chunks(index)
        self.servers.home(self.shard).put_many([(grad_name(step, self.shard, index, c), self._encode(step, start, stop))
                                                for c, (start, stop) in enumerate(chunks)])
        queues = [chunks_for(c) for c in range(len(chunks))] if self.layout.ring else [GRAD_ARRIVALS]
        self.servers.stores[0].notify(queues, grad_token(step, self.shard, index, loss))

    def _encode(self, step: int, start: int, stop: int) -> np.ndarray:
        if self.feedback is None:
            return to_wire(self.flat_grad[start:stop], self.wire)
        return self.feedback.encode(start, stop, self.flat_grad[start:stop].detach().cpu().numpy(), self.exact(step))

    def flush(self) -> None:
        """Wait until every bucket submitted is in the store (backward may then reuse the buffer)."""
        self._thread.flush()

    def close(self) -> None:
        self._thread.close()


class ChunkReducer:
    """ring: a worker's thread that reduces its own chunk of every bucket, in shard order, as
    soon as all N workers' copies of it are in, and hands the result to the generator.

    A NaN or inf shows in the reduced sum; only then is each copy looked at, and the workers
    found non-finite are named in the token (the generator decides what that means).
    """

    def __init__(self, servers: ServerGroup, shard: int, layout: Layout, wire: str, mode: str,
                 report_to: tuple[str, ...] = (GRAD_REDUCED,)) -> None:
        self.servers, self.shard, self.layout, self.wire, self.mode = servers, shard, layout, wire, mode
        self.report_to = list(report_to)  # the queues told of each reduced chunk
        self.n = layout.n_chunks
        self.busy_s = 0.0  # fetching, reducing and putting, beside the compute
        self.error: Exception | None = None
        self._out = [np.empty(stop - start, np.float32) for start, stop in
                     (layout.chunks(b.index)[shard] for b in layout.buckets)]
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"chunk-reducer-{shard}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        control, home = self.servers.stores[0], self.servers.home(self.shard)
        copies: dict[tuple[int, int], dict[int, np.ndarray]] = {}
        losses: dict[tuple[int, int], dict[int, float]] = {}
        try:
            while not self._closed:
                tokens = [parse_grad_token(t) for t in control.next_tokens(chunks_for(self.shard), POLL_S)]
                if not tokens:
                    continue
                t0 = time.perf_counter()
                arrays = self.servers.get_many([(sender, grad_name(step, sender, index, self.shard))
                                                for step, sender, index, _ in tokens])
                for (step, sender, index, loss), array in zip(tokens, arrays):
                    copies.setdefault((step, index), {})[sender] = from_wire(array, self.wire)
                    losses.setdefault((step, index), {})[sender] = loss
                for step, index in sorted({(step, index) for step, _, index, _ in tokens}):
                    got = copies[(step, index)]
                    if len(got) < self.n:
                        continue
                    ordered, out = [got[s] for s in range(self.n)], self._out[index]
                    bad = ([] if reduce_is_finite(ordered, out, self.mode) else
                           [s for s in range(self.n) if not finite(ordered[s])])
                    home.put(out, reduced_name(step, index, self.shard))
                    by_shard = losses.pop((step, index))
                    control.notify(self.report_to, reduced_token(step, index, self.shard, bad,
                                                                 [by_shard[s] for s in range(self.n)]))
                    del copies[(step, index)]
                self.busy_s += time.perf_counter() - t0
        except Exception as e:  # reported to the worker's own thread by check
            self.error = e

    def check(self) -> None:
        """Raise what went wrong in the thread, if anything (the generator would wait for it forever)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=10)


class ParameterLoader:
    """A worker's thread that copies the parent's parameters into the model bucket by bucket,
    as the generator publishes them."""

    def __init__(self, servers: ServerGroup, shard: int, layout: Layout, flat_params: torch.Tensor, wire: str) -> None:
        self.servers, self.shard, self.layout, self.flat_params, self.wire = servers, shard, layout, flat_params, wire
        # What the model holds, on the host (the model's own memory on the CPU): an int8 wire
        # brings changes to it.
        self.held = host_array(flat_params)
        self.busy_s = 0.0  # time spent fetching and copying, beside the compute
        self.error: Exception | None = None
        self.loaded = [threading.Event() for _ in layout.buckets]
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
        control = self.servers.stores[0]
        while (version := self._versions.get()) is not None:
            try:
                for _ in self.layout.buckets:
                    tokens = []
                    while not tokens:
                        if self._closed:
                            return
                        tokens = control.next_tokens(params_ready(self.shard), POLL_S, most=1)
                    t0 = time.perf_counter()
                    got_version, index = map(int, tokens[0].split())
                    if got_version != version:
                        raise RuntimeError(f"worker {self.shard + 1} expected parameters of version {version}, "
                                           f"the generator published {got_version}")
                    chunks = self.layout.chunks(index)
                    arrays = self.servers.get_many([(c, params_name(version, index, c)) for c in range(len(chunks))])
                    for (start, stop), array in zip(chunks, arrays):
                        receive_parameters(self.held[start:stop], array, self.wire)
                        if self.flat_params.device.type != "cpu":
                            copy_into(self.flat_params[start:stop], self.held[start:stop])
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
            if not waits.blocking(lambda: event.wait(POLL_S)) and stopped():
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

    def __init__(self, model: nn.Module, buckets: list[Bucket], loader: ParameterLoader | None,
                 sender: GradientSender, stopped: Callable[[], bool]) -> None:
        self.buckets, self.loader, self.sender, self.stopped = buckets, loader, sender, stopped
        self.load_wait_s = 0.0  # blocked in forward waiting for parameters
        self.step, self.loss = 0, 0.0
        self._remaining = [len(b.params) for b in buckets]
        params = list(model.parameters())
        for b in buckets:
            for i in b.params:
                params[i].register_post_accumulate_grad_hook(self._finished_hook(b.index))
        if loader is not None:  # None: the worker keeps its own parameters (ring-allreduce)
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
        if self.loader is not None:
            self.loader.request(step)

    def before_backward(self, loss: float) -> None:
        """Every bucket is loaded before backward reads the parameters (a layer whose forward
        never ran would otherwise still be loading)."""
        self.loss = loss
        for b in self.buckets if self.loader is not None else ():
            self.load_wait_s += self.loader.wait(b.index, self.stopped)


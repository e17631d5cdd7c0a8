"""The hand-offs between neighbouring stages of a replica: activations forward, their
gradients backward, one store key per (step, replica, micro-batch, stage, direction), in the
raw codec (float32, nothing unpickled), and a Redis list per receiving worker and direction
that says which key is there, so that a stage blocks on its neighbour without polling.

    act-{step}-{replica}-{microbatch}-{stage}-{fwd|bwd}   what stage `stage` sent
    handoff-{fwd|bwd}-for-{worker}                         "{step} {microbatch}", in order
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from libe_cnn import stream
from libe_cnn.store import ServerGroup
from libe_cnn.stream import POLL_S, Stopped

FORWARD, BACKWARD = "fwd", "bwd"


def activation_name(step: int, replica: int, microbatch: int, stage: int, direction: str) -> str:
    return f"act-{step}-{replica}-{microbatch}-{stage}-{direction}"


def handoff_queue(worker: int, direction: str) -> str:
    return f"handoff-{direction}-for-{worker}"


class Neighbours:
    """One stage's hand-offs with the stages before and after it (workers w - 1 and w + 1).

    Each piece lives on its sender's home server; the receiver deletes it once read.
    """

    def __init__(self, servers: ServerGroup, worker: int, n_stages: int, stopped: Callable[[], bool]) -> None:
        self.servers, self.worker, self.stopped = servers, worker, stopped
        self.replica, self.stage = divmod(worker, n_stages)
        self.wait_s = 0.0  # blocked waiting for a neighbour: the bubble, and any imbalance
        self.busy_s = 0.0  # putting and getting

    def send(self, step: int, microbatch: int, direction: str, tensor: torch.Tensor) -> None:
        t0 = time.perf_counter()
        to = self.worker + (1 if direction == FORWARD else -1)
        array = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
        name, control, home = (activation_name(step, self.replica, microbatch, self.stage, direction),
                               self.servers.stores[0], self.servers.home(self.worker))
        told = ([handoff_queue(to, direction)], f"{step} {microbatch}")
        if home is control:  # one round trip for the piece and its announcement
            home.put_many([(name, array)], notify=told)
        else:
            home.put(array, name)
            control.notify(*told)
        self.busy_s += time.perf_counter() - t0

    def receive(self, step: int, microbatch: int, direction: str) -> torch.Tensor:
        """What the neighbour sent for (step, microbatch) in `direction`. Raises Stopped."""
        control, queue = self.servers.stores[0], handoff_queue(self.worker, direction)
        t0 = time.perf_counter()
        # Through the module, where the in-process test harness replaces it.
        while not (tokens := stream.blocking(lambda: control.next_tokens(queue, POLL_S, most=1))):
            if self.stopped():
                raise Stopped()
        t1 = time.perf_counter()
        if tokens[0] != f"{step} {microbatch}":
            raise RuntimeError(f"worker {self.worker + 1} expected micro-batch {microbatch} of step {step} "
                               f"({direction}), got {tokens[0]!r}")
        sender = self.worker + (-1 if direction == FORWARD else 1)
        store = self.servers.home(sender)
        key = store.key(activation_name(step, self.replica, microbatch, self.stage + sender - self.worker, direction))
        tensor = torch.from_numpy(np.array(store.take(key)))  # a writable copy: autograd may write into it
        self.wait_s += t1 - t0
        self.busy_s += time.perf_counter() - t1
        return tensor

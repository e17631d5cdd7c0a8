"""The hand-offs between neighbouring stages of a replica: activations forward, their
gradients backward, one store key per (step, replica, micro-batch, stage, direction), in the
raw codec (float32, nothing unpickled):

    act-{step}-{replica}-{microbatch}-{stage}-{fwd|bwd}   what stage `stage` sent

The receiver knows which key it needs next, so the key itself is the hand-off: a Redis list
the sender pushes the piece onto and the receiver blocks on (BLPOP), one round trip each way,
no polling, and nothing left once read. (A piece under a key of its own plus a queue of tokens
announcing it took three round trips, and 1F1B, which crosses between the stages about twice
per micro-batch on its critical path, paid for each: benchmarks/README.md.) The stage pushes
its pieces itself: a sender thread, so that the stage computes during the push, measured
slower on two busy cores (1F1B at M=8: 418 against 440 samples/s over three interleaved
rounds, bubble 0.17 against 0.11 on stage 0), the thread's wake-ups competing with the compute.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from libe_cnn.store import ServerGroup
from libe_cnn.waits import POLL_S, wait_for

FORWARD, BACKWARD = "fwd", "bwd"


def activation_name(step: int, replica: int, microbatch: int, stage: int, direction: str) -> str:
    return f"act-{step}-{replica}-{microbatch}-{stage}-{direction}"


class Neighbours:
    """One stage's hand-offs with the stages before and after it (workers w - 1 and w + 1).

    Each piece lives on its sender's home server until the receiver takes it.
    """

    def __init__(self, servers: ServerGroup, worker: int, n_stages: int, stopped: Callable[[], bool]) -> None:
        self.servers, self.worker, self.stopped = servers, worker, stopped
        self.replica, self.stage = divmod(worker, n_stages)
        self.wait_s = 0.0  # blocked waiting for a neighbour: the bubble, and any imbalance
        self.busy_s = 0.0  # handing over and taking

    def send(self, step: int, microbatch: int, direction: str, tensor: torch.Tensor) -> None:
        t0 = time.perf_counter()
        array = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
        self.servers.home(self.worker).hand_over(
            activation_name(step, self.replica, microbatch, self.stage, direction), array)
        self.busy_s += time.perf_counter() - t0

    def receive(self, step: int, microbatch: int, direction: str) -> torch.Tensor:
        """What the neighbour sent for (step, microbatch) in `direction`. Raises Stopped."""
        sender = self.worker + (-1 if direction == FORWARD else 1)
        store = self.servers.home(sender)
        name = activation_name(step, self.replica, microbatch, self.stage + sender - self.worker, direction)
        t0 = time.perf_counter()
        array = wait_for(lambda: store.take(name, POLL_S), self.stopped)
        t1 = time.perf_counter()
        tensor = torch.from_numpy(np.array(array))  # a writable copy: autograd may write into it
        # The wait includes the transfer of the piece itself: BLPOP returns it whole.
        self.wait_s += t1 - t0
        self.busy_s += time.perf_counter() - t1
        return tensor

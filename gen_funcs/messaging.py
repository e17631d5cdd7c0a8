"""The generator's messages: rows to and from the simulators through libEnsemble, with liveness.

Rows carry store keys and small numbers only; the tensors they name are fetched from the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from libensemble.comms.comms import Timeout as CommTimeout
from libensemble.message_numbers import PERSIS_STOP, STOP_TAG
from libensemble.tools.persistent_support import PersistentSupport

from libe_cnn import waits
from libe_cnn.config import TrainConfig
from libe_cnn.liveness import TTL_S, LivenessCheck
from libe_cnn.plan import SIM_OUT
from libe_cnn.store import TensorStore
from libe_cnn.reduction import finite
from libe_cnn.wire import from_wire

# How long the generator waits for rows before it checks that every worker is alive.
LIVENESS_CHECK_S = 2.0


class RunAborted(RuntimeError):
    """The run cannot go on; the parent is kept as it was before the cause."""


class WorkerLost(RunAborted):
    """A simulator stopped sending heartbeats: it died, hangs, or lost its node."""


class NonFinite(RunAborted):
    """A worker sent NaN or inf (--on-nonfinite stop)."""


@dataclass
class Gathered:
    """One row per simulator, in shard order, with what was fetched for them."""

    rows: np.ndarray
    results: list[np.ndarray] | None  # float32 buffers, when fetched
    wait_s: float  # blocked waiting for rows
    fetch_s: float  # fetching their buffers


class Messenger:
    """Sends rows to the simulators, receives theirs, and notices a simulator gone silent."""

    def __init__(self, cfg: TrainConfig, ps: PersistentSupport, store: TensorStore, liveness: LivenessCheck,
                 gen_out) -> None:
        self.cfg, self.n = cfg, cfg.n_workers
        self.ps, self.store, self.liveness, self.gen_out = ps, store, liveness, gen_out
        self.sim_rows = np.dtype(SIM_OUT)
        # Rows received while waiting on the store, for the next `receive`; and whether a stop came.
        self._early: list[np.ndarray] = []
        self._stop_seen = False

    def send(self, count: int, version: int, n_steps: int = 1, params_key: str = "", peers_key: str = "",
             checkpoint: bool = False) -> None:
        """`count` identical rows; libEnsemble hands each to a simulator that is waiting."""
        rows = np.zeros(count, dtype=self.gen_out)
        rows["params_key"], rows["peers_key"] = params_key, peers_key
        rows["version"], rows["n_steps"], rows["checkpoint"] = version, n_steps, checkpoint
        self.ps.send(rows)

    def receive(self) -> np.ndarray | None:
        """The next simulator rows (one or more), or None when the manager stops the run.

        Raises WorkerLost if a simulator goes silent meanwhile, rather than wait forever.
        """
        if self._early:
            return self._early.pop(0)
        if self._stop_seen:
            return None
        while not self._mail_within(LIVENESS_CHECK_S):
            self.check_liveness()
        tag, _, calc_in = self.ps.recv()
        return None if tag in (STOP_TAG, PERSIS_STOP) else calc_in

    def check_liveness(self) -> None:
        lost = self.liveness.lost()
        if lost:
            raise WorkerLost(", ".join(f"worker {s + 1}" for s in lost)
                             + f" stopped responding (no heartbeat for {TTL_S} s): it died, hangs, or lost its node")

    def stopped(self) -> bool:
        """Whether the manager has stopped the run; rows that came meanwhile are kept for `receive`."""
        while not self._stop_seen and self.ps.comm.mail_flag():
            tag, _, calc_in = self.ps.recv()
            if tag in (STOP_TAG, PERSIS_STOP):
                self._stop_seen = True
            else:
                self._early.append(calc_in)
        return self._stop_seen

    def next_tokens(self, queue: str) -> list[str] | None:
        """The next tokens of one of the run's queues in the store (one, or all that are there);
        None when the manager stops the run.

        Raises WorkerLost if a simulator goes silent meanwhile, rather than wait forever.
        """
        silent_since = time.perf_counter()
        while True:
            # Looked at before every wait, not only when none comes: the workers keep sending
            # while the manager stops the run (Ctrl-C, an exit criterion).
            if self.stopped():
                return None
            tokens = waits.blocking(lambda: self.store.next_tokens(queue, waits.POLL_S))
            if tokens:
                return tokens
            if time.perf_counter() - silent_since >= LIVENESS_CHECK_S:
                self.check_liveness()
                silent_since = time.perf_counter()

    def _mail_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for a message from the manager, leaving it to be received."""
        comm = self.ps.comm  # libEnsemble's local and MPI comms both take a timeout and a push-back
        try:
            message = comm.recv(timeout=seconds)
        except CommTimeout:
            return False
        comm.push_to_buffer(*message)
        return True

    def screen(self, results: list[np.ndarray], shards, step: int, what: str) -> list[int]:
        """Indices of non-finite results (of the workers `shards`); with --on-nonfinite stop,
        the first one ends the run."""
        bad = [i for i, r in enumerate(results) if not finite(r)]
        self.nonfinite([int(shards[i]) for i in bad], step, what)
        return bad

    def nonfinite(self, workers: list[int], step: int, what: str) -> None:
        """With --on-nonfinite stop, workers found to have sent NaN or inf end the run."""
        if workers and self.cfg.on_nonfinite == "stop":
            named = ", ".join(f"worker {s + 1}" for s in workers)
            raise NonFinite(f"non-finite {what} (NaN or inf) from {named} at step {step}; the parent is kept "
                            "from before it (lower --lr, or --on-nonfinite skip)")

    def fetch(self, keys: list[str]) -> list[np.ndarray]:
        return [from_wire(a, self.cfg.wire_dtype) for a in self.store.get_many(keys)]

    def gather(self, fetch: bool, evict: bool, version: int | None = None) -> Gathered | None:
        """One row from every simulator (of `version`, if given: later rows are kept for later);
        with `fetch`, each result as soon as its row arrives.

        Fetching while slower workers still compute takes most of the transfer off the
        step's critical path. Rows and results come back in shard order, so the math runs
        in the same order in every run.
        """
        rows: dict[int, np.void] = {}
        results: dict[int, np.ndarray] = {}
        wait_s = fetch_s = 0.0
        held, self._early = self._early, []  # rows kept from before are looked at first, once
        later: list[np.ndarray] = []
        while len(rows) < self.n:
            t0 = time.perf_counter()
            calc_in = held.pop(0) if held else self.receive()
            if calc_in is None:
                return None
            t1 = time.perf_counter()
            if version is not None and (calc_in["version"] != version).any():
                # A streaming worker may report its next step before a slower one reports this one.
                later.append(calc_in[calc_in["version"] != version])
                calc_in = calc_in[calc_in["version"] == version]
            for row in calc_in:
                shard = int(row["shard"])
                if shard in rows or not 0 <= shard < self.n:
                    raise RuntimeError(f"unexpected result from shard {shard}")
                rows[shard] = row
            keys = [str(k) for k in calc_in["result_key"]]
            if fetch:
                for row, result in zip(calc_in, self.fetch(keys)):
                    results[int(row["shard"])] = result
            if evict:
                self.store.evict(keys)
            wait_s += t1 - t0
            fetch_s += time.perf_counter() - t1
        self._early = held + later + self._early
        ordered = np.array([rows[s] for s in range(self.n)], dtype=calc_in.dtype)
        return Gathered(ordered, [results[s] for s in range(self.n)] if fetch else None, wait_s, fetch_s)

"""An in-process stand-in for libEnsemble: the real generator and simulators, no processes.

    run_dir = run_in_process(["-n", "3", "--max-steps", "8", ...], redis_address, tmp_path)
    run_in_process(["--resume", str(run_dir), "--max-steps", "12"], redis_address)

runs `parent_model_gen` and N `child_trainer_sim`s in threads of the test process and
returns the run directory, with the files a real run writes there (config.json,
metrics.jsonl, summary.json, checkpoint.pt, model.pt, curves.png). The run is prepared by
run_libe_cnn.prepare itself, on the test session's Redis. Nothing of libEnsemble runs but
the user functions' own `PersistentSupport`: a fake manager routes their messages the way
`only_persistent_gens` does with alt_type, async_return and active_recv_gen (see
run_libe_cnn.run_ensemble):

  * the generator's first N rows start the N simulators, in order: workers 1..N, each with
    its row as `H` and its `workerID` in libE_info;
  * later rows go, one each, to the simulators waiting for work, in the order they began to
    wait (rows nobody waits for are kept until someone does);
  * every row a simulator sends reaches the generator at once, as calc_in in the SIM_OUT
    dtype (with coalesce=True: the rows that arrived while the generator was busy come
    together, as libEnsemble batches them when it is slow to poll);
  * when the generator returns FINISHED_PERSISTENT_GEN_TAG, every simulator gets PERSIS_STOP;
  * with stop_after=K, the generator gets STOP_TAG after its K-th simulator row, as when an
    exit criterion trips or Ctrl-C stops a real run (no row after the K-th reaches it).

The messages are libEnsemble's own: (tag, Work dict) then (0, rows) for work, and
(PERSIS_STOP | STOP_TAG, MAN_SIGNAL_*) to stop; `recv(timeout=...)` raises
libensemble.comms.comms.Timeout and `push_to_buffer` / `mail_flag` behave as QComm's.

Threads, not processes, so a few things that are per process in a real run are guarded:

  * One thread computes at a time (a "turn" lock, released only while a thread waits for a
    message, or for the streamed exchange: libe_cnn.waits.blocking). Torch's random generator
    is per process, and the user functions seed it and draw from it (initial weights, dropout
    masks); taking turns keeps every draw where a real run makes it, so a run is as
    reproducible as with processes (sync and the periodic strategies bit for bit; in async the
    order of arrival varies, as it does with processes). A thread that waits in the middle of
    its forward (for a parameter bucket) gets its random state back when its turn returns.
  * `signal.signal` is a no-op outside the main thread (the simulators ignore SIGINT), and
    `os.setpriority` is not called (the generator lowers the manager thread's priority:
    here that would be pytest's main thread, for the rest of the session).
  * The caller's torch random state is restored afterwards.

Failures surface in the test: the first exception of the generator or of a simulator is
re-raised once everyone has stopped (a simulator's failure stops the others and the
generator with STOP_TAG, as libEnsemble's manager does), and a run that does not end
within `timeout` seconds fails with the stack of every thread still running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import queue
import signal
import struct
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import numpy as np
from libensemble.comms.comms import Timeout
from libensemble.message_numbers import (
    EVAL_GEN_TAG,
    EVAL_SIM_TAG,
    FINISHED_PERSISTENT_GEN_TAG,
    FINISHED_PERSISTENT_SIM_TAG,
    MAN_SIGNAL_FINISH,
    MAN_SIGNAL_KILL,
    PERSIS_STOP,
    STOP_TAG,
)

DEFAULT_TIMEOUT_S = 120.0
# After the deadline or a failure, how long the threads get to notice and return.
GRACE_S = 20.0


class HarnessAbort(Exception):
    """Raised in a thread's recv when the harness gives up on the run."""


class ProtocolError(AssertionError):
    """A user function sent something libEnsemble would refuse or misroute."""


class EnsembleTimeout(AssertionError):
    """The run did not end in time; the message has the stack of every thread still running."""


# --- comms ---

class FakeComm:
    """The part of a libEnsemble comm that PersistentSupport and the generator use.

    Semantics of libensemble.comms.comms.QComm: send puts a message (an args tuple) in the
    outbox, recv takes the next one (a pushed-back message first), with a timeout raising
    Timeout; mail_flag says whether the inbox holds a message. The outbox is the fake
    manager's queue, each message stamped with the sender's worker id.
    """

    def __init__(self, worker_id: int, ensemble: FakeEnsemble) -> None:
        self.worker_id = worker_id
        self._ensemble = ensemble
        self.inbox: queue.Queue = queue.Queue()
        self.recv_buffer: tuple | None = None
        self.blocked = threading.Event()  # set while waiting in recv for a message
        self.aborted = False

    def send(self, *args) -> None:
        if self.aborted:
            raise HarnessAbort("the harness stopped the run")
        self._ensemble.to_manager.put(("message", self.worker_id, args))

    def recv(self, timeout: float | None = None) -> tuple:
        if self.aborted:
            raise HarnessAbort("the harness stopped the run")
        buffered, self.recv_buffer = self.recv_buffer, None
        if buffered is not None:
            return buffered
        try:
            message = self.inbox.get_nowait()
        except queue.Empty:
            message = self._wait(timeout)
        if message is _ABORT:
            self.aborted = True
            raise HarnessAbort("the harness stopped the run")
        return message

    def _wait(self, timeout: float | None):
        """Block for the next message, letting other threads take their turn meanwhile."""
        turn = self._ensemble.turn
        turn.release()
        self.blocked.set()
        self._ensemble.to_manager.put(("waiting", self.worker_id, None))
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise Timeout() from None
        finally:
            self.blocked.clear()
            turn.acquire()

    def push_to_buffer(self, *args) -> None:
        self.recv_buffer = args

    def mail_flag(self) -> bool:
        return not self.inbox.empty()

    def deliver(self, *args) -> None:
        """From the manager: one message for this worker."""
        self.inbox.put(args)

    def abort(self) -> None:
        self.inbox.put(_ABORT)


_ABORT = object()


# --- process-wide state the threads must not disturb ---

@contextlib.contextmanager
def thread_safe_process_state(modules_prefixes=("gen_funcs", "sim_funcs", "libe_cnn", "mnist")):
    """signal.signal off the main thread and os.setpriority become no-ops; torch's RNG is restored."""
    import torch

    real_signal, real_setpriority = signal.signal, os.setpriority
    main = threading.main_thread()

    def thread_safe_signal(signum, handler):
        if threading.current_thread() is main:
            return real_signal(signum, handler)
        return signal.getsignal(signum)  # only the main thread may set handlers; a process's sim ignores SIGINT

    def no_setpriority(which, who, priority):
        return None

    # Also where a module holds its own reference (`from signal import signal`).
    patched = [(signal, "signal", real_signal, thread_safe_signal), (os, "setpriority", real_setpriority, no_setpriority)]
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(modules_prefixes):
            continue
        for attr, value in list(vars(module).items()):
            if value is real_signal and module is not signal:
                patched.append((module, attr, real_signal, thread_safe_signal))
            elif value is real_setpriority and module is not os:
                patched.append((module, attr, real_setpriority, no_setpriority))
    rng = torch.get_rng_state()
    for module, attr, _, fake in patched:
        setattr(module, attr, fake)
    try:
        yield
    finally:
        for module, attr, real, _ in patched:
            setattr(module, attr, real)
        torch.set_rng_state(rng)


# --- the fake manager ---

@dataclasses.dataclass
class Outcome:
    """What one user function did: its return value or its exception (with traceback)."""

    worker_id: int
    value: tuple | None = None
    error: BaseException | None = None
    traceback: str = ""


class FakeEnsemble:
    """The generator and N persistent simulators in threads, routed like libEnsemble would."""

    def __init__(self, plan, n_workers: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 coalesce: bool = False, gen_max: int | None = None, stop_after: int | None = None) -> None:
        from gen_funcs.parent_model import parent_model_gen
        from libe_cnn.plan import GEN_OUT, SIM_OUT
        from sim_funcs.child_trainer import child_trainer_sim

        self.plan = plan
        self.n = n_workers if n_workers is not None else plan.config.n_workers
        self.timeout = timeout
        self.coalesce = coalesce
        self.gen_max = gen_max
        self.stop_after = stop_after
        self.gen_f, self.sim_f = parent_model_gen, child_trainer_sim
        self.gen_out, self.sim_out = np.dtype(GEN_OUT), np.dtype(SIM_OUT)
        self.gen_specs = {"gen_f": parent_model_gen, "in": [], "persis_in": list(self.sim_out.names),
                          "out": GEN_OUT, "user": {"plan": plan}}
        self.sim_specs = {"sim_f": child_trainer_sim, "in": list(self.gen_out.names),
                          "persis_in": list(self.gen_out.names), "out": SIM_OUT, "user": {"plan": plan}}
        self.to_manager: queue.Queue = queue.Queue()
        self.turn = threading.Lock()
        self.comms = {w: FakeComm(w, self) for w in range(self.n + 1)}  # 0: the generator
        self.threads: dict[int, threading.Thread] = {}
        self.outcomes: dict[int, Outcome] = {}
        self.pending: deque = deque()  # generator rows not yet given to a simulator
        self.idle: deque = deque()  # simulators waiting for work, in the order they began to wait
        self.returned: list[np.ndarray] = []  # simulator rows not yet given to the generator
        self.stopped: set[int] = set()  # workers told to stop (0: the generator)
        self.gen_rows = 0  # rows the generator has sent (libEnsemble's gen_max counts these)
        self.sim_rows = 0  # simulator rows given to the generator
        self.log: list[tuple] = []  # (event, worker, rows): what was routed, for tests to inspect
        self.failure: Outcome | None = None  # the first failure

    # --- threads ---

    def _start(self, worker_id: int, fn, H, specs: dict, H_rows: np.ndarray) -> None:
        libE_info = {"H_rows": H_rows, "comm": self.comms[worker_id], "workerID": worker_id,
                     "executor": None, "persistent": True, "active_recv": worker_id == 0}

        def body():
            outcome = Outcome(worker_id)
            self.turn.acquire()
            try:
                outcome.value = fn(H, {}, specs, libE_info)
            except BaseException as e:  # noqa: BLE001 - everything is reported to the test
                outcome.error, outcome.traceback = e, traceback.format_exc()
            finally:
                self.turn.release()
                self.to_manager.put(("done", worker_id, outcome))

        name = "fake-gen" if worker_id == 0 else f"fake-sim-{worker_id}"
        thread = threading.Thread(target=body, name=name, daemon=True)
        self.threads[worker_id] = thread
        thread.start()

    # --- routing ---

    def _rows(self, D, dtype: np.dtype, who: str) -> np.ndarray:
        if not isinstance(D, dict) or "calc_out" not in D:
            raise ProtocolError(f"{who} sent {type(D).__name__}, not PersistentSupport's dict with calc_out")
        out = D["calc_out"]
        if out is None or not isinstance(out, np.ndarray) or out.dtype.names is None:
            raise ProtocolError(f"{who} sent calc_out {out!r}, not a structured array")
        missing = set(dtype.names) - set(out.dtype.names)
        extra = set(out.dtype.names) - set(dtype.names)
        if missing or extra:
            raise ProtocolError(f"{who} sent rows with fields missing {sorted(missing)} / unknown {sorted(extra)}")
        rows = np.zeros(len(out), dtype=dtype)  # what libEnsemble's history hands on: copies, by field name
        for name in dtype.names:
            rows[name] = out[name]
        return rows

    def _work(self, tag: int, fields: list[str], rows: np.ndarray, first_id: int, worker_id: int) -> dict:
        info = {"H_rows": np.arange(first_id, first_id + len(rows)), "persistent": True}
        if worker_id == 0:
            info["active_recv"] = True
        return {"H_fields": fields, "persis_info": {}, "tag": tag, "libE_info": info}

    def _on_message(self, worker_id: int, args: tuple) -> None:
        if len(args) != 2:
            raise ProtocolError(f"worker {worker_id} sent {len(args)} values, not (tag, data)")
        tag, D = args
        if worker_id == 0:
            if tag != EVAL_GEN_TAG:
                raise ProtocolError(f"the generator sent tag {tag}, not EVAL_GEN_TAG")
            rows = self._rows(D, self.gen_out, "the generator")
            self.log.append(("gen", 0, rows))
            for row in rows:
                self.pending.append((self.gen_rows, row))
                self.gen_rows += 1
            if self.gen_max is not None and self.gen_rows >= self.gen_max:
                raise ProtocolError(f"the generator sent {self.gen_rows} rows, reaching gen_max {self.gen_max}: "
                                    "libEnsemble would have stopped the run")
        else:
            if tag != EVAL_SIM_TAG:
                raise ProtocolError(f"simulator {worker_id} sent tag {tag}, not EVAL_SIM_TAG")
            rows = self._rows(D, self.sim_out, f"simulator {worker_id}")
            self.log.append(("sim", worker_id, rows))
            keep_state = isinstance(D.get("libE_info"), dict) and D["libE_info"].get("keep_state")
            if not keep_state and worker_id not in self.stopped:
                self.idle.append(worker_id)
            if 0 not in self.outcomes and 0 not in self.stopped:
                self.returned.append(rows)

    def _dispatch(self) -> None:
        """Hand out what can be handed out now."""
        while self.pending:
            started = sum(1 for w in self.threads if w != 0)
            if started < self.n:  # the first N rows start the simulators: workers 1..N
                sim_id, row = self.pending.popleft()
                worker_id = started + 1
                H = np.zeros(1, dtype=self.gen_out)
                H[0] = row
                self.log.append(("start", worker_id, H))
                self._start(worker_id, self.sim_f, H, self.sim_specs, np.array([sim_id]))
                continue
            if not self.idle:
                break
            worker_id = self.idle.popleft()
            sim_id, row = self.pending.popleft()
            rows = np.zeros(1, dtype=self.gen_out)
            rows[0] = row
            self.comms[worker_id].deliver(EVAL_SIM_TAG, self._work(EVAL_SIM_TAG, list(self.gen_out.names), rows,
                                                                   sim_id, worker_id))
            self.comms[worker_id].deliver(0, rows)
        gen = self.comms[0]
        while self.returned and 0 not in self.stopped and (not self.coalesce or gen.blocked.is_set()):
            batches = self.returned if self.coalesce else self.returned[:1]
            rows = np.concatenate(batches)
            del self.returned[: len(batches)]
            if self.stop_after is not None:
                rows = rows[: self.stop_after - self.sim_rows]
            if len(rows):
                self.log.append(("to_gen", 0, rows))
                gen.deliver(EVAL_GEN_TAG, self._work(EVAL_GEN_TAG, list(self.sim_out.names), rows, self.sim_rows, 0))
                gen.deliver(0, rows)
                self.sim_rows += len(rows)
            if self.stop_after is not None and self.sim_rows >= self.stop_after:
                # What the manager does when an exit criterion trips or on Ctrl-C: stop the generator.
                self.stopped.add(0)
                self.returned.clear()
                self.log.append(("stop_gen", 0, None))
                gen.deliver(STOP_TAG, MAN_SIGNAL_FINISH)
            if self.coalesce:
                break

    def _stop_sims(self, tag: int, signal_: int) -> None:
        for worker_id in self.threads:
            if worker_id != 0 and worker_id not in self.stopped and worker_id not in self.outcomes:
                self.stopped.add(worker_id)
                self.comms[worker_id].deliver(tag, signal_)

    # --- the run ---

    def run(self) -> list[Outcome]:
        """Run to the end; re-raises the first failure. Returns every function's outcome."""
        from libe_cnn import waits
        from run_libe_cnn import open_transport

        deadline = time.monotonic() + self.timeout
        real_blocking, waits.blocking = waits.blocking, self._blocking
        try:
            # As a real run: its shared memory (--transport) exists while it runs, and goes at its end.
            with thread_safe_process_state(), contextlib.ExitStack() as transport:
                open_transport(self.plan, transport)
                self._start(0, self.gen_f, np.zeros(0, dtype=self.gen_out), self.gen_specs, np.arange(0))
                try:
                    self._loop(deadline)
                except BaseException:  # Ctrl-C, or a bug here: wake every thread so none is left waiting
                    for comm in self.comms.values():
                        comm.abort()
                    raise
        finally:
            waits.blocking = real_blocking
        failure = self.failure
        errors = [o for o in self.outcomes.values() if o.error is not None and not isinstance(o.error, HarnessAbort)]
        if failure is not None:
            first = failure.error
            first.add_note(f"(raised in {_who(failure.worker_id)} of the in-process ensemble)")
            for other in errors:
                if other is not failure:
                    first.add_note(f"also, in {_who(other.worker_id)}:\n{other.traceback}")
            raise first
        return list(self.outcomes.values())

    def _blocking(self, wait):
        """libe_cnn.waits.blocking here: the others take their turn while this thread waits,
        and it gets its own random state back afterwards (torch's is the process's)."""
        import torch

        rng = torch.get_rng_state()
        self.turn.release()
        try:
            return wait()
        finally:
            self.turn.acquire()
            torch.set_rng_state(rng)

    def _loop(self, deadline: float) -> None:
        """Route messages until every function has returned; the first failure goes to self.failure."""
        failure: Outcome | None = None
        while len(self.outcomes) < len(self.threads) or 0 not in self.outcomes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._give_up(f"the run did not end within {self.timeout:.0f} s" if failure is None else
                              f"after {failure.error!r} in {_who(failure.worker_id)}, the others did not stop "
                              f"within {GRACE_S:.0f} s", cause=failure.error if failure else None)
            try:
                kind, worker_id, payload = self.to_manager.get(timeout=remaining)
            except queue.Empty:
                continue
            try:
                if kind == "message":
                    self._on_message(worker_id, payload)
                elif kind == "done":
                    failed = self._on_done(payload)
                    failure = failure or failed
                self._dispatch()
            except ProtocolError as e:
                failure = failure or Outcome(-1, error=e, traceback=traceback.format_exc())
                self._stop_everyone()
            if failure is not None:  # the others get a short while to stop
                deadline = min(deadline, time.monotonic() + GRACE_S)
            self.failure = failure

    def _on_done(self, outcome: Outcome) -> Outcome | None:
        """A function returned or raised. Returns the outcome if it is a failure."""
        w = outcome.worker_id
        self.outcomes[w] = outcome
        if w == 0:
            if outcome.error is not None:
                self._stop_sims(PERSIS_STOP, MAN_SIGNAL_KILL)
                return outcome
            if not (isinstance(outcome.value, tuple) and len(outcome.value) == 3
                    and outcome.value[2] == FINISHED_PERSISTENT_GEN_TAG):
                outcome.error = ProtocolError(f"the generator returned {outcome.value!r}, "
                                              "not (output, persis_info, FINISHED_PERSISTENT_GEN_TAG)")
                self._stop_sims(PERSIS_STOP, MAN_SIGNAL_KILL)
                return outcome
            self.returned.clear()
            self._stop_sims(PERSIS_STOP, MAN_SIGNAL_KILL)  # as the manager does once the generator is done
            return None
        if outcome.error is None:
            if w not in self.stopped:
                outcome.error = ProtocolError(f"simulator {w} returned before it was told to stop")
            elif not (isinstance(outcome.value, tuple) and len(outcome.value) == 3
                      and outcome.value[2] == FINISHED_PERSISTENT_SIM_TAG):
                outcome.error = ProtocolError(f"simulator {w} returned {outcome.value!r}, "
                                              "not (output, persis_info, FINISHED_PERSISTENT_SIM_TAG)")
        if outcome.error is not None and not isinstance(outcome.error, HarnessAbort):
            self._stop_everyone()
            return outcome
        return None

    def _stop_everyone(self) -> None:
        """What libEnsemble's manager does when a worker fails: STOP to everyone still running."""
        if 0 in self.threads and 0 not in self.outcomes and 0 not in self.stopped:
            self.stopped.add(0)
            self.comms[0].deliver(STOP_TAG, MAN_SIGNAL_FINISH)
        self._stop_sims(STOP_TAG, MAN_SIGNAL_FINISH)

    def _give_up(self, why: str, cause: BaseException | None = None):
        """Abort every comm, give the threads a moment, and fail with where each one is stuck."""
        for comm in self.comms.values():
            comm.abort()
        end = time.monotonic() + GRACE_S
        for thread in self.threads.values():
            thread.join(max(0.0, end - time.monotonic()))
        frames = sys._current_frames()
        stacks = []
        for worker_id, thread in self.threads.items():
            if thread.is_alive() and thread.ident in frames:
                stacks.append(f"--- {_who(worker_id)} ---\n" + "".join(traceback.format_stack(frames[thread.ident])))
        done = ", ".join(f"{_who(w)}: {'error ' + repr(o.error) if o.error else 'returned'}"
                         for w, o in sorted(self.outcomes.items()))
        raise EnsembleTimeout(f"{why}; finished: {done or 'none'}; pending rows {len(self.pending)}, idle {list(self.idle)}"
                              + ("\n" + "\n".join(stacks) if stacks else "")) from cause


def _who(worker_id: int) -> str:
    return "the harness" if worker_id < 0 else "the generator" if worker_id == 0 else f"simulator {worker_id}"


# --- running a configuration ---

def redis_options(redis_address) -> list[str]:
    """The options that point a run at the test session's Redis server."""
    password = [f"--redis-password={redis_address.password}"] if redis_address.password else []
    return ["--redis-host", redis_address.host, "--redis-port", str(redis_address.port), *password]


def prepare_in_process(argv: list[str], redis_address, run_dir: Path | None):
    """The plan of a run, prepared on the given Redis by run_libe_cnn.prepare itself.

    That is what a real run does on its manager: check the devices, find and check the data,
    plan the schedule, check the checkpoint when resuming (--resume RUN_DIR in argv; run_dir
    is then unused), create the run directory and write config.json. The Redis options are
    appended (they may change on a resume); the run's keys are deleted by run_plan.
    """
    from libe_cnn.cli import config_from_args
    from run_libe_cnn import prepare

    resume = "--resume" in argv
    cfg = config_from_args([*argv, *redis_options(redis_address)] if resume else
                           [*argv, "--run-dir", str(run_dir), *redis_options(redis_address)])
    with contextlib.ExitStack() as stack:  # its callback deletes the run's keys: none yet
        plan = prepare(cfg, stack)
    return dataclasses.replace(plan, redis=redis_address)


def run_keys(redis_address, run_id: str) -> list[str]:
    with redis_address.client() as client:
        return sorted(k.decode() for k in client.scan_iter(match=f"{run_id}:*", count=1000))


def delete_run_keys(redis_address, run_id: str) -> int:
    """What a real run does at its end: delete whatever of its keys remain."""
    keys = run_keys(redis_address, run_id)
    if keys:
        with redis_address.client() as client:
            client.delete(*keys)
    return len(keys)


@dataclasses.dataclass
class InProcessRun:
    run_dir: Path
    ensemble: FakeEnsemble  # its .log has every routed row
    leftover_keys: list[str]  # the run's keys still in Redis when the functions had returned


def run_plan(plan, redis_address, **options) -> InProcessRun:
    """Run a prepared plan; the run's keys are deleted afterwards, as a real run does."""
    cfg = plan.config
    options.setdefault("gen_max", cfg.n_workers * (plan.total_steps + 2))  # run_libe_cnn's exit criterion
    ensemble = FakeEnsemble(plan, **options)
    leftover: list[str] = []
    try:
        ensemble.run()
    finally:
        leftover = run_keys(redis_address, cfg.run_id)
        delete_run_keys(redis_address, cfg.run_id)
    return InProcessRun(Path(cfg.run_dir), ensemble, leftover)


def run_ensemble_in_process(argv: list[str], redis_address, tmp_path: Path | None = None, name: str = "run",
                            **options) -> InProcessRun:
    """run_in_process, returning the ensemble (its routing log) and the keys left behind too."""
    run_dir = None if "--resume" in argv else Path(tmp_path) / name
    return run_plan(prepare_in_process(argv, redis_address, run_dir), redis_address, **options)


def run_in_process(argv: list[str], redis_address, tmp_path: Path | None = None, name: str = "run",
                   **options) -> Path:
    """Run `run_libe_cnn.py ARGV` in this process; returns the run directory.

    A new run goes to tmp_path/name; with "--resume RUN_DIR" in argv the run continues in
    RUN_DIR (tmp_path and name are unused). Options: timeout (s), coalesce (batch the rows
    that arrive while the generator is busy), stop_after (stop the generator, as an exit
    criterion or Ctrl-C would, once it has been given this many simulator rows). The first
    exception of the generator or of a simulator is raised; the run's files are there either way.
    """
    return run_ensemble_in_process(argv, redis_address, tmp_path, name, **options).run_dir


# --- small datasets made from the real one ---

def _read_idx(path: str | Path) -> np.ndarray:
    data = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        data = gzip.decompress(data)
    _, _, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_subset(files, root: Path, n_train: int, n_test: int) -> Path:
    """The first n_train training and n_test test samples of an IDX dataset, in torchvision's layout.

    The first K samples are the same as the full dataset's, so runs with --limit-train K
    train on the same shards and batches; only the (slow) evaluation sees fewer images.
    Returns the root to give as --data-dir.
    """
    from tests.conftest import write_idx

    folder = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[files.name]
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stems = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
    for key, stem in stems.items():
        array = _read_idx(files.paths[key])
        write_idx(raw / stem, array[: n_train if key.startswith("train") else n_test])
    return Path(root)

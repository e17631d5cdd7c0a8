"""The child trainer: a persistent libEnsemble simulator that owns one shard of the data.

It runs the chosen strategy's worker loop (libe_cnn/strategies): sync streams parameters in
and the gradient out bucket by bucket (`streamed_gradient_loop`); with async each message
names parameters to load, and the worker sends back one gradient of its next batch
(`gradient_loop`); with the periodic ones it takes K local optimizer steps
of its own, sends back its parameters and applies what the strategy makes of the
generator's answer (`local_rounds`).
"""

from __future__ import annotations

import signal
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from libensemble.message_numbers import EVAL_SIM_TAG, FINISHED_PERSISTENT_SIM_TAG, PERSIS_STOP, STOP_TAG
from libensemble.tools.persistent_support import PersistentSupport

from libe_cnn.buckets import bucket_layout
from libe_cnn.flat import copy_into, flatten_gradients, flatten_parameters, host_array, push_host_array
from libe_cnn.liveness import Heartbeat
from libe_cnn.plan import RunPlan, plan_from_user, resume_key
from libe_cnn.runtime import rss_mb
from libe_cnn.store import ServerGroup, TensorStore
from libe_cnn.strategies.sync import exchange_layout
from libe_cnn.strategies.ring_allreduce import gather_reduced
from libe_cnn.stream import ChunkReducer, GradientSender, Layout, ParameterLoader, Stopped, StreamedModel, reduced_for
from libe_cnn.wire import from_wire, to_wire
from sim_funcs.inbox import Inbox
from sim_funcs.shard import Shard, worker_device
from sim_funcs.stage_trainer import StageWorker
from mnist.data import dropout_seed
from mnist.model import load_optimizer_state_vector, make_optimizer, new_model, optimizer_state_vector


class ChildWorker:
    """One worker's shard, model and store connection; its batches come in a seeded order."""

    def __init__(self, plan: RunPlan, shard: int) -> None:
        cfg = plan.config
        self.plan, self.cfg, self.shard = plan, cfg, shard
        self.device = worker_device(cfg, shard)
        self.data = Shard(plan, shard, cfg.n_workers, self.device)
        # Its weights come from the generator: no need to draw them from the seed.
        self.model = new_model(cfg.dataset, cfg.model, cfg.dropout).to(self.device).train()
        self.flat_params = flatten_parameters(self.model)
        self.flat_grad = flatten_gradients(self.model)
        self.store = TensorStore(plan.redis, cfg.run_id, plan.shm_dir)
        # The batch this worker trains on first: 0, or where a resumed run left off.
        self.first_batch = plan.resume_positions[shard] if plan.resume_positions else 0

    def gradient(self, x: torch.Tensor, y: torch.Tensor, t: int,
                 before_backward: Callable[[float], None] | None = None) -> float:
        """Forward and backward once on batch number `t`; the gradient lands in flat_grad."""
        # Dropout masks are drawn from (seed, worker, batch): they differ between workers, and
        # a resumed run draws the same ones as an uninterrupted run.
        torch.manual_seed(dropout_seed(self.cfg.seed, self.shard, t))
        self.flat_grad.zero_()
        loss = F.nll_loss(self.model(x), y)
        value = loss.item()
        if before_backward is not None:
            before_backward(value)
        loss.backward()
        return value

    def load_params(self, key: str) -> np.ndarray:
        """Fetch parameters from the store as float32 (read-only, host memory)."""
        return from_wire(self.store.get(key), self.cfg.wire_dtype)

    def put(self, flat: torch.Tensor, name: str | None = None) -> str:
        return self.store.put(to_wire(flat, self.cfg.wire_dtype), name)

    def result_row(self, dtype, key: str, version: int, loss: float, n_samples: int, times: tuple,
                   state_key: str = "") -> np.ndarray:
        out = np.zeros(1, dtype=dtype)
        out["result_key"], out["state_key"] = key, state_key
        out["version"] = version
        out["loss"] = loss
        out["n_samples"] = n_samples
        out["shard"] = self.shard
        out["load_s"], out["compute_s"], out["put_s"], out["wait_s"] = times
        out["rss_mb"] = rss_mb()
        return out

    def load_into_model(self, key: str) -> None:
        copy_into(self.flat_params, self.load_params(key))

    def set_params(self, params: np.ndarray) -> None:
        copy_into(self.flat_params, params)

    def update_params(self, update) -> None:
        """Apply `update` (host float32 array, in place) to the model's parameters."""
        host = host_array(self.flat_params)
        update(host)
        push_host_array(self.flat_params, host)

    def gradient_loop(self, ps: PersistentSupport, row: np.void, out_dtype) -> None:
        """Gradient strategies: load the parameters named, send back one gradient, repeat."""
        t = self.first_batch  # batches done by this worker
        prepared, x, y = t, *self.data.batch(t)
        wait_s = 0.0  # time blocked waiting for the previous answer
        while True:
            # Every step starts from the parameters the generator just named for this worker.
            t0 = time.perf_counter()
            self.load_into_model(str(row["params_key"]))
            if prepared != t:
                x, y = self.data.batch(t)
            t1 = time.perf_counter()
            loss = self.gradient(x, y, t)
            t2 = time.perf_counter()
            key = self.put(self.flat_grad)
            t3 = time.perf_counter()
            out = self.result_row(out_dtype, key, int(row["version"]), loss, len(y), (t1 - t0, t2 - t1, t3 - t2, wait_s))
            t += 1
            # The next batch is gathered while the generator works on this one.
            prepared, x, y = t, *self.data.batch(t)
            tag, _, calc_in = ps.send_recv(out)
            wait_s = time.perf_counter() - t3
            if tag in (STOP_TAG, PERSIS_STOP):
                return
            row = calc_in[0]

    def streamed_gradient_loop(self, ps: PersistentSupport, row: np.void, out_dtype) -> None:
        """sync: parameters arrive bucket by bucket during forward, the gradient leaves bucket
        by bucket during backward (libe_cnn/stream.py); a row per step reports the timings.

        With ring, a third thread reduces this worker's chunk of everyone's gradient.
        The worker never waits on libEnsemble: the generator sends each step's rows ahead, and
        the worker takes one only when it reports a step, by which time it is there. (The
        manager may hand out the rows of two steps in either order; the result says its step.)
        """
        cfg = self.cfg
        layout = exchange_layout(bucket_layout(self.model, cfg.bucket_mb * 2**20), cfg)
        loader = ParameterLoader(self.server_group(), self.shard, layout, self.flat_params, cfg.wire_dtype)
        # int8: the gradients of a step that ends at a checkpoint go whole (libe_cnn/wire.py).
        sender = GradientSender(self.server_group(), self.shard, layout, self.flat_grad, cfg.wire_dtype,
                                exact=lambda step: self.plan.checkpoint_at(step + 1))
        reducer = (ChunkReducer(self.server_group(), self.shard, layout, cfg.wire_dtype, cfg.reduce)
                   if layout.ring else None)
        threads = [loader, sender] + ([reducer] if reducer else [])
        inbox = Inbox(ps, row)
        stopped = stop_check(inbox, reducer)
        stream = StreamedModel(self.model, layout.buckets, loader, sender, stopped)
        t = self.first_batch
        try:
            while t < self.plan.total_steps:
                t0 = time.perf_counter()
                stream.begin(t)
                x, y = self.data.batch(t)
                busy, load_wait = sum(w.busy_s for w in threads), stream.load_wait_s
                t1 = time.perf_counter()
                try:
                    loss = self.gradient(x, y, t, stream.before_backward)
                except Stopped:
                    return
                t2 = time.perf_counter()
                sender.flush()
                t3 = time.perf_counter()
                row = inbox.next_row()
                t4 = time.perf_counter()
                if row is None:
                    return
                waited = stream.load_wait_s - load_wait
                out = self.result_row(out_dtype, "", t, loss, len(y),
                                      (t1 - t0 + waited, t2 - t1 - waited, t3 - t2, t4 - t3))
                out["exchange_s"] = sum(w.busy_s for w in threads) - busy
                ps.send(out)
                t += 1
            inbox.next_row()  # the generator is done: this is the manager's stop
        finally:
            for thread in threads:
                thread.close()
                thread.servers.close()

    def allreduce_loop(self, ps: PersistentSupport, row: np.void, out_dtype) -> None:
        """ring-allreduce: the gradient leaves bucket by bucket during backward, in chunks to the
        workers that reduce them; this worker reduces its own chunk of everyone's (a thread),
        reads every reduced chunk back and takes the optimizer step itself."""
        cfg, n = self.cfg, self.cfg.n_workers
        layout = Layout(bucket_layout(self.model, cfg.bucket_mb * 2**20), n)
        optimizer = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr)
        if self.plan.resume_positions is not None:
            self.restore_own_state(optimizer)
        else:
            self.load_into_model(str(row["params_key"]))
        sender = GradientSender(self.server_group(), self.shard, layout, self.flat_grad, cfg.wire_dtype)
        reducer = ChunkReducer(self.server_group(), self.shard, layout, cfg.wire_dtype, "mean",
                               report_to=tuple(reduced_for(s) for s in range(n)))
        servers = self.server_group()
        inbox = Inbox(ps, row)
        stopped = stop_check(inbox, reducer)
        stream = StreamedModel(self.model, layout.buckets, None, sender, stopped)
        t = self.first_batch
        try:
            while t < self.plan.total_steps:
                t0 = time.perf_counter()
                stream.begin(t)
                x, y = self.data.batch(t)
                busy = sender.busy_s + reducer.busy_s
                t1 = time.perf_counter()
                loss = self.gradient(x, y, t, stream.before_backward)
                t2 = time.perf_counter()
                sender.flush()
                try:
                    bad = gather_reduced(servers, self.shard, layout, t, self.flat_grad, stopped)
                except Stopped:
                    return
                if not bad:  # every worker sees the same: all step, or none
                    optimizer.step()
                t3 = time.perf_counter()
                row = inbox.next_row()
                t4 = time.perf_counter()
                if row is None:
                    return
                state_key = ""
                if row["checkpoint"] and self.shard == 0:  # the workers are identical: one state does
                    state_key = self.store.put(np.concatenate([host_array(self.flat_params),
                                                               optimizer_state_vector(optimizer, cfg.optimizer)]))
                out = self.result_row(out_dtype, "", t, loss, len(y), (t1 - t0, t2 - t1, t3 - t2, t4 - t3), state_key)
                out["exchange_s"] = sender.busy_s + reducer.busy_s - busy
                out["nonfinite_from"] = ",".join(map(str, bad))
                ps.send(out)
                t += 1
            inbox.next_row()  # the generator is done: this is the manager's stop
        finally:
            for thread in (sender, reducer):
                thread.close()
                thread.servers.close()
            servers.close()

    def close(self) -> None:
        self.store.close()

    def server_group(self) -> ServerGroup:
        """Connections to every store server of the run (each thread of the exchange needs its own)."""
        return ServerGroup(self.plan.servers, self.cfg.run_id, self.plan.homes, self.plan.shm_dir)

    def restore_own_state(self, optimizer) -> None:
        """Resuming: this worker's parameters and optimizer state, as the checkpoint holds them."""
        state = self.store.get(self.store.key(resume_key(self.shard)))
        n_params = self.flat_params.numel()
        copy_into(self.flat_params, state[:n_params])
        load_optimizer_state_vector(optimizer, self.cfg.optimizer, state[n_params:])

    def local_rounds(self, ps: PersistentSupport, row: np.void, out_dtype, strategy) -> None:
        """Periodic strategies: K optimizer steps alone, then one exchange, as the strategy says."""
        cfg = self.cfg
        # Each worker keeps its own optimizer state across exchanges, as in local SGD.
        optimizer = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr)
        memo: dict = {}  # what the strategy keeps between the halves of a round (easgd: the center)
        t = self.first_batch  # local steps done by this worker
        if self.plan.resume_positions is not None:
            self.restore_own_state(optimizer)
        wait_s = 0.0
        while True:
            t0 = time.perf_counter()
            strategy.receive(self, row, t, memo)
            t1 = time.perf_counter()
            n_steps, loss_sum, n_samples = int(row["n_steps"]), 0.0, 0
            for _ in range(n_steps):
                x, y = self.data.batch(t)
                loss_sum += self.gradient(x, y, t)
                optimizer.step()
                n_samples += len(y)
                t += 1
            t2 = time.perf_counter()
            key = self.store.put(strategy.result_for_wire(self, row, memo), strategy.result_name(t, self.shard))
            t3 = time.perf_counter()
            strategy.after_put(self, memo)
            state_key = ""
            if row["checkpoint"]:
                # Everything this worker carries into the next round, in float32 whatever the wire.
                state = [host_array(self.flat_params), optimizer_state_vector(optimizer, cfg.optimizer)]
                state_key = self.store.put(np.concatenate(state))
            out = self.result_row(out_dtype, key, int(row["version"]), loss_sum / n_steps, n_samples,
                                  (t1 - t0, t2 - t1, t3 - t2, wait_s), state_key)
            tag, _, calc_in = ps.send_recv(out)
            wait_s = time.perf_counter() - t3
            if tag in (STOP_TAG, PERSIS_STOP):
                return
            row = calc_in[0]


def stop_check(inbox: Inbox, reducer: ChunkReducer | None) -> Callable[[], bool]:
    """What a streaming worker asks while it waits: whether it was stopped, and (raising it)
    whether its chunk reducer failed, which would leave every other worker waiting for its chunk."""
    def stopped() -> bool:
        if reducer is not None:
            reducer.check()
        return inbox.stopped()
    return stopped


def child_trainer_sim(H, persis_info, sim_specs, libE_info):
    plan = plan_from_user(sim_specs["user"])
    shard = libE_info["workerID"] - 1  # the generator runs on the manager; workers are 1..N
    # Ctrl-C in a terminal reaches every process of the job; the manager alone handles it
    # and stops the simulators in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    heartbeat = Heartbeat(plan.redis, plan.config.run_id, shard)
    try:
        pipeline = plan.config.parallelism == "pipeline"
        worker = StageWorker(plan, shard) if pipeline else ChildWorker(plan, shard)
        ps = PersistentSupport(libE_info, EVAL_SIM_TAG)
        try:
            plan.strategy.run_worker(worker, ps, H[0], sim_specs["out"])
        finally:
            worker.close()
    finally:
        heartbeat.stop()
    return None, persis_info, FINISHED_PERSISTENT_SIM_TAG

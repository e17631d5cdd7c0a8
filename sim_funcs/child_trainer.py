"""The child trainer: a persistent libEnsemble simulator that owns one shard of the data.

With --strategy sync or async, each message from the generator names parameters to load;
the worker runs forward and backward once on its next batch and sends back its gradient.
With the other strategies it takes K local optimizer steps of its own and sends back its
parameters, then applies whatever the generator answers: a new parent (param-avg,
weighted-param-avg), a center to pull toward (easgd), a peer to average with (gossip), or
nothing (local).
"""

from __future__ import annotations

import signal
import time

import numpy as np
import torch
import torch.nn.functional as F
from libensemble.message_numbers import EVAL_SIM_TAG, FINISHED_PERSISTENT_SIM_TAG, PERSIS_STOP, STOP_TAG
from libensemble.tools.persistent_support import PersistentSupport

from gen_funcs.aggregation import elastic_pull, pairwise_average
from libe_cnn.flat import copy_into, flatten_gradients, flatten_parameters, host_array, push_host_array
from libe_cnn.liveness import Heartbeat
from libe_cnn.plan import RunPlan, gossip_key, plan_from_user, resume_key
from libe_cnn.runtime import (
    available_cores,
    gpu_count,
    local_rank,
    rss_mb,
    select_device,
    set_threads,
    threads_per_worker,
)
from libe_cnn.store import TensorStore
from libe_cnn.wire import from_wire, to_wire
from mnist.data import epoch_order, load_shard
from mnist.model import MODELS, load_optimizer_state_vector, make_optimizer, optimizer_state_vector


class ChildWorker:
    """One worker's shard, model and store connection; its batches come in a seeded order."""

    def __init__(self, plan: RunPlan, shard: int) -> None:
        cfg = plan.config
        self.plan, self.cfg, self.shard = plan, cfg, shard
        set_threads(threads_per_worker(available_cores(), cfg.n_workers))
        self.device = torch.device(select_device(cfg.device, local_rank(default=shard), gpu_count()))
        images, labels = load_shard(plan.files, plan.n_train, cfg.n_workers, shard, cfg.seed)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self._orders: dict[int, np.ndarray] = {}
        # Its weights come from the generator: no need to draw them from the seed.
        self.model = MODELS[cfg.dataset](dropout=cfg.dropout).to(self.device).train()
        self.flat_params = flatten_parameters(self.model)
        self.flat_grad = flatten_gradients(self.model)
        self.store = TensorStore(plan.redis, cfg.run_id)
        # The batch this worker trains on first: 0, or where a resumed run left off.
        self.first_batch = plan.resume_positions[shard] if plan.resume_positions else 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The worker's batch number `step`, counted from the start of training."""
        epoch, b = divmod(step, self.plan.steps_per_epoch)
        if epoch not in self._orders:
            self._orders.clear()
            self._orders[epoch] = epoch_order(len(self.labels), self.cfg.seed, self.shard, epoch)
        size = self.cfg.batch_size
        pos = torch.from_numpy(self._orders[epoch][b * size : (b + 1) * size]).to(self.device)
        return self.images[pos], self.labels[pos]

    def gradient(self, x: torch.Tensor, y: torch.Tensor, t: int) -> float:
        """Forward and backward once on batch number `t`; the gradient lands in flat_grad."""
        # Dropout masks are drawn from (seed, worker, batch): they differ between workers, and
        # a resumed run draws the same ones as an uninterrupted run.
        torch.manual_seed((self.cfg.seed * 1_000_003 + self.shard) * 1_000_003 + t)
        self.flat_grad.zero_()
        loss = F.nll_loss(self.model(x), y)
        loss.backward()
        return loss.item()

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


def gradient_loop(w: ChildWorker, ps: PersistentSupport, row: np.void, out_dtype) -> None:
    """sync and async: load the parameters named, send back one gradient, repeat."""
    t = w.first_batch  # batches done by this worker
    prepared, x, y = t, *w.batch(t)
    wait_s = 0.0  # time blocked waiting for the previous answer
    while True:
        # sync: every step starts from the parameters the generator just published;
        # async: from the newest ones, whatever the other workers are doing.
        t0 = time.perf_counter()
        copy_into(w.flat_params, w.load_params(str(row["params_key"])))
        if prepared != t:
            x, y = w.batch(t)
        t1 = time.perf_counter()
        loss = w.gradient(x, y, t)
        t2 = time.perf_counter()
        key = w.put(w.flat_grad)
        t3 = time.perf_counter()
        out = w.result_row(out_dtype, key, int(row["step"]), loss, len(y), (t1 - t0, t2 - t1, t3 - t2, wait_s))
        t += 1
        # The next batch is gathered while the generator works on this one.
        prepared, x, y = t, *w.batch(t)
        tag, _, calc_in = ps.send_recv(out)
        wait_s = time.perf_counter() - t3
        if tag in (STOP_TAG, PERSIS_STOP):
            return
        row = calc_in[0]


def local_steps_loop(w: ChildWorker, ps: PersistentSupport, row: np.void, out_dtype) -> None:
    """The periodic strategies and local: K optimizer steps alone, then one exchange."""
    cfg = w.cfg
    # Each worker keeps its own optimizer state across exchanges, as in local SGD.
    optimizer = make_optimizer(cfg.optimizer, w.model.parameters(), cfg.lr)
    center = None  # easgd: the center this round's pull goes toward
    t = w.first_batch  # local steps done by this worker
    if w.plan.resume_positions is not None:
        # Its parameters and optimizer state from the checkpoint, as the generator left them.
        state = w.store.get(w.store.key(resume_key(w.shard)))
        n_params = w.flat_params.numel()
        copy_into(w.flat_params, state[:n_params])
        load_optimizer_state_vector(optimizer, cfg.optimizer, state[n_params:])
    wait_s = 0.0
    while True:
        t0 = time.perf_counter()
        if row["params_key"]:
            params = w.load_params(str(row["params_key"]))
            if cfg.strategy == "easgd":
                center = params.copy()
                if t == 0:  # everyone starts from the center
                    copy_into(w.flat_params, params)
            else:
                copy_into(w.flat_params, params)
        if row["peers_key"]:
            peer = int(w.store.get(str(row["peers_key"]))[w.shard])
            if peer >= 0:  # with odd N, one worker sits a round out
                host = host_array(w.flat_params)
                pairwise_average(host, w.load_params(w.store.key(gossip_key(t, peer))))
                push_host_array(w.flat_params, host)
        t1 = time.perf_counter()
        n_steps, loss_sum, n_samples = int(row["n_steps"]), 0.0, 0
        for _ in range(n_steps):
            x, y = w.batch(t)
            loss_sum += w.gradient(x, y, t)
            optimizer.step()
            n_samples += len(y)
            t += 1
        t2 = time.perf_counter()
        key = w.put(w.flat_params, gossip_key(t, w.shard) if cfg.strategy == "gossip" else None)
        t3 = time.perf_counter()
        if cfg.strategy == "easgd":
            # The worker's half of the elastic exchange; the generator moves the center by
            # the same amount from the parameters just sent.
            host = host_array(w.flat_params)
            elastic_pull(host, center, cfg.easgd_alpha)
            push_host_array(w.flat_params, host)
        state_key = ""
        if row["checkpoint"]:
            # Everything this worker carries into the next round, in float32 whatever the wire.
            state = [host_array(w.flat_params), optimizer_state_vector(optimizer, cfg.optimizer)]
            state_key = w.store.put(np.concatenate(state))
        out = w.result_row(out_dtype, key, int(row["step"]), loss_sum / n_steps, n_samples,
                           (t1 - t0, t2 - t1, t3 - t2, wait_s), state_key)
        tag, _, calc_in = ps.send_recv(out)
        wait_s = time.perf_counter() - t3
        if tag in (STOP_TAG, PERSIS_STOP):
            return
        row = calc_in[0]


def child_trainer_sim(H, persis_info, sim_specs, libE_info):
    plan = plan_from_user(sim_specs["user"])
    shard = libE_info["workerID"] - 1  # the generator runs on the manager; workers are 1..N
    # Ctrl-C in a terminal reaches every process of the job; the manager alone handles it
    # and stops the simulators in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    heartbeat = Heartbeat(plan.redis, plan.config.run_id, shard)
    try:
        worker = ChildWorker(plan, shard)
        ps = PersistentSupport(libE_info, EVAL_SIM_TAG)
        loop = gradient_loop if plan.config.strategy in ("sync", "async") else local_steps_loop
        try:
            loop(worker, ps, H[0], sim_specs["out"])
        finally:
            worker.store.close()
    finally:
        heartbeat.stop()
    return None, persis_info, FINISHED_PERSISTENT_SIM_TAG

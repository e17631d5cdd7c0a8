"""The child trainer: a persistent libEnsemble simulator that owns one shard of the data.

Each step it loads the parameters the generator published, runs forward and backward once
on its next batch, puts the flat gradient into the store and sends the key back.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import torch
import torch.nn.functional as F
from libensemble.message_numbers import EVAL_SIM_TAG, FINISHED_PERSISTENT_SIM_TAG, PERSIS_STOP, STOP_TAG
from libensemble.tools.persistent_support import PersistentSupport

from libe_cnn.flat import copy_into, flatten_gradients, flatten_parameters
from libe_cnn.plan import plan_from_user
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
from mnist.model import Net


def child_trainer_sim(H, persis_info, sim_specs, libE_info):
    plan = plan_from_user(sim_specs["user"])
    cfg = plan.config
    shard = libE_info["workerID"] - 1  # the generator runs on the manager; workers are 1..N
    # Ctrl-C in a terminal reaches every process of the job; the manager alone handles it
    # and stops the simulators in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    set_threads(threads_per_worker(available_cores(), cfg.n_workers))
    device = torch.device(select_device(cfg.device, local_rank(default=shard), gpu_count()))
    torch.manual_seed(cfg.seed * 7919 + shard + 1)  # dropout masks differ per worker

    images, labels = load_shard(plan.files, plan.n_train, cfg.n_workers, shard, cfg.seed)
    images, labels = images.to(device), labels.to(device)
    shard_size = len(labels)
    epoch_orders: dict[int, np.ndarray] = {}

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, b = divmod(step, plan.steps_per_epoch)
        if epoch not in epoch_orders:
            epoch_orders.clear()
            epoch_orders[epoch] = epoch_order(shard_size, cfg.seed, shard, epoch)
        pos = torch.from_numpy(epoch_orders[epoch][b * cfg.batch_size : (b + 1) * cfg.batch_size]).to(device)
        return images[pos], labels[pos]

    model = Net(dropout=cfg.dropout).to(device).train()
    flat_params = flatten_parameters(model)
    flat_grad = flatten_gradients(model)
    store = TensorStore(plan.redis, cfg.run_id)
    ps = PersistentSupport(libE_info, EVAL_SIM_TAG)

    row = H[0]
    prepared_step, x, y = int(row["step"]), *batch(int(row["step"]))
    wait_s = 0.0  # time blocked waiting for the previous step's parameters
    try:
        while True:
            # Why wait here: synchronous data parallelism, every step starts from the
            # parameters the generator just published.
            t0 = time.perf_counter()
            copy_into(flat_params, from_wire(store.get(str(row["params_key"])), cfg.wire_dtype))
            step = int(row["step"])
            if step != prepared_step:
                x, y = batch(step)
            t1 = time.perf_counter()
            flat_grad.zero_()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            t2 = time.perf_counter()
            grad_key = store.put(to_wire(flat_grad, cfg.wire_dtype))
            t3 = time.perf_counter()

            out = np.zeros(1, dtype=sim_specs["out"])
            out["grad_key"] = grad_key
            out["loss"] = loss.item()
            out["n_samples"] = len(y)
            out["shard"] = shard
            out["load_s"], out["compute_s"], out["put_s"], out["wait_s"] = t1 - t0, t2 - t1, t3 - t2, wait_s
            out["rss_mb"] = rss_mb()
            # The next batch is gathered while the generator works on this step.
            prepared_step, x, y = step + 1, *batch(step + 1)
            tag, _, calc_in = ps.send_recv(out)
            wait_s = time.perf_counter() - t3
            if tag in (STOP_TAG, PERSIS_STOP):
                break
            row = calc_in[0]
    finally:
        store.close()
    return None, persis_info, FINISHED_PERSISTENT_SIM_TAG

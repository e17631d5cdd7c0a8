"""A pipeline stage (--parallelism pipeline): a persistent simulator that holds one stage's
layers of one replica's model (libe_cnn/pipeline).

Every step it loads its stage's parameters from the generator, runs the schedule's forwards
and backwards over the batch's micro-batches, taking its input from the stage before and the
gradient of its output from the stage after (the first stage reads the batch, the last one
the labels and computes the loss), and sends the gradient of its own parameters to the
generator, which steps and publishes them back.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from libe_cnn.flat import copy_into, flatten_gradients, flatten_parameters
from libe_cnn.pipeline.handoff import BACKWARD, FORWARD, Neighbours
from libe_cnn.pipeline.schedule import schedule
from libe_cnn.pipeline.split import stage_bounds, stage_buckets, stage_of_bucket
from libe_cnn.plan import RunPlan
from libe_cnn.runtime import rss_mb
from libe_cnn.store import ServerGroup
from libe_cnn.stream import GRAD_ARRIVALS, grad_name, grad_token, params_name, params_ready
from libe_cnn.waits import POLL_S, Stopped, wait_for
from libe_cnn.wire import from_wire, to_wire
from mnist.data import dropout_seed
from mnist.model import new_model
from sim_funcs.inbox import Inbox
from sim_funcs.shard import Shard, worker_device


class StageWorker:
    """Worker w: stage w % K of replica w // K, holding only that stage's layers."""

    def __init__(self, plan: RunPlan, shard: int) -> None:
        cfg = plan.config
        self.plan, self.cfg, self.shard = plan, cfg, shard
        self.replica, self.stage = divmod(shard, cfg.stages)
        self.last = self.stage == cfg.stages - 1
        self.device = worker_device(cfg, shard)
        whole = new_model(cfg.dataset, cfg.model, cfg.dropout)
        layers = whole.layers()
        bounds = stage_bounds(cfg.split, len(layers))
        self.bucket = next(b for b in stage_buckets(whole, cfg.split) if stage_of_bucket(b, cfg.stages) == self.stage)
        # Only this stage's layers stay: the rest of the model goes with `whole`.
        self.module = nn.Sequential(*layers[bounds[self.stage]:bounds[self.stage + 1]]).to(self.device).train()
        del whole, layers
        self.flat_params = flatten_parameters(self.module)
        self.flat_grad = flatten_gradients(self.module)
        # The first stage reads the images, the last one the labels, of the replica's shard.
        self.data = Shard(plan, self.replica, cfg.replicas, self.device) if self.stage == 0 or self.last else None
        self.first_batch = plan.resume_positions[shard] if plan.resume_positions else 0

    def batch(self, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The replica's batch number `step`, cut into the micro-batches (empty lists for a middle stage)."""
        if self.data is None:
            return [], []
        x, y = self.data.batch(step)
        m = self.cfg.microbatches
        return list(x.tensor_split(m)), list(y.tensor_split(m))

    def load_params(self, servers: ServerGroup, version: int, stopped) -> None:
        """Wait for the generator to publish this stage's parameters of `version`, and load them."""
        control = servers.stores[0]
        tokens = wait_for(lambda: control.next_tokens(params_ready(self.shard), POLL_S, most=1) or None, stopped)
        if tokens[0] != f"{version} {self.bucket.index}":
            raise RuntimeError(f"worker {self.shard + 1} expected its parameters of version {version}, "
                               f"the generator published {tokens[0]!r}")
        array = servers.get_many([(0, params_name(version, self.bucket.index, 0))])[0]
        copy_into(self.flat_params, from_wire(array, self.cfg.wire_dtype))

    def train_step(self, step: int, neighbours: Neighbours) -> float:
        """The schedule's forwards and backwards of one step; the gradient lands in flat_grad.
        Returns the batch's loss on the last stage (NaN elsewhere). Raises Stopped."""
        cfg = self.cfg
        m = cfg.microbatches
        xs, ys = self.batch(step)
        self.flat_grad.zero_()
        held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        loss_sum = 0.0
        for op in schedule(self.stage, cfg.stages, m, cfg.schedule):
            i = op.microbatch
            if op.forward:
                x = xs[i] if self.stage == 0 else neighbours.receive(step, i, FORWARD).to(self.device).requires_grad_()
                # Dropout masks from (seed, worker, micro-batch): a resumed run draws the same ones.
                torch.manual_seed(dropout_seed(cfg.seed, self.shard, step * m + i))
                out = self.module(x)
                if self.last:
                    # The mean over the batch, summed over its micro-batches: the loss of the whole batch.
                    out = F.nll_loss(out, ys[i]) * (len(ys[i]) / cfg.batch_size)
                    loss_sum += out.item()
                else:
                    neighbours.send(step, i, FORWARD, out)
                held[i] = (x, out)
            else:
                x, out = held.pop(i)
                out.backward(None if self.last else neighbours.receive(step, i, BACKWARD).to(self.device))
                if self.stage > 0:
                    neighbours.send(step, i, BACKWARD, x.grad)
        return loss_sum if self.last else math.nan

    def close(self) -> None:
        pass  # its connections are the loop's own

    def pipeline_loop(self, ps, row: np.void, out_dtype) -> None:
        cfg = self.cfg
        servers = ServerGroup(self.plan.servers, cfg.run_id, self.plan.homes, self.plan.shm_dir)
        inbox = Inbox(ps, row)
        neighbours = Neighbours(servers, self.shard, cfg.stages, inbox.stopped)
        t = self.first_batch
        try:
            while t < self.plan.total_steps:
                t0 = time.perf_counter()
                waited, busy = neighbours.wait_s, neighbours.busy_s
                try:
                    self.load_params(servers, t, inbox.stopped)
                    t1 = time.perf_counter()
                    loss = self.train_step(t, neighbours)
                except Stopped:
                    return
                t2 = time.perf_counter()
                servers.home(self.replica).put(to_wire(self.flat_grad, cfg.wire_dtype),
                                               grad_name(t, self.replica, self.bucket.index, 0))
                servers.stores[0].notify([GRAD_ARRIVALS], grad_token(t, self.replica, self.bucket.index, loss))
                t3 = time.perf_counter()
                row = inbox.next_row()
                t4 = time.perf_counter()
                if row is None:
                    return
                waited, busy = neighbours.wait_s - waited, neighbours.busy_s - busy
                out = np.zeros(1, dtype=out_dtype)
                out["version"], out["loss"], out["shard"] = t, loss, self.shard
                out["n_samples"] = cfg.batch_size
                out["load_s"], out["compute_s"], out["put_s"], out["wait_s"] = (
                    t1 - t0, t2 - t1 - waited - busy, t3 - t2, t4 - t3)
                out["exchange_s"], out["peer_wait_s"], out["rss_mb"] = busy, waited, rss_mb()
                ps.send(out)
                t += 1
            inbox.next_row()  # the generator is done: this is the manager's stop
        finally:
            servers.close()

"""sync: every step, one gradient per worker -> reduce in shard order -> one optimizer step.

Synchronous parallel SGD, the all-reduce of DDP (Dean et al. 2012; Goyal et al. 2017), with
DDP's overlap: the exchange is streamed in buckets (libe_cnn/stream.py). Each bucket of the
workers' gradients is reduced as soon as all N copies are there, while the workers' backward
goes on: by the generator (--reduce-topology star), or first among the workers, each reducing
one chunk (ring), so that the generator reads one reduced gradient whatever N. The last bucket
completes the step, and the new parameters are published bucket by bucket, the first layers'
first, for the workers' next forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from libe_cnn.buckets import forward_order
from libe_cnn.stream import Layout
from libe_cnn.stream_generator import Publisher, Senders, params_keys, publish, reduce_step
from libe_cnn.strategies.base import Counters, Option, Strategy

REDUCE = Option("reduce", "--reduce", "combine the workers' gradients by sum or mean", default="sum", type=str,
                choices=("sum", "mean"))
# fc1 of the MNIST CNN (4.5 MiB) is one bucket and the convolutions (75 KiB) another at any size
# from 0.1 to 4.5; 1 MiB is DDP's first bucket.
BUCKET_MB = Option("bucket_mb", "--bucket-mb", "gradients and parameters travel in buckets of about this size",
                   default=1.0, type=float, metavar="MB",
                   check=lambda v, n: None if v > 0 else f"--bucket-mb must be positive (got {v})")


# On one machine star moves fewer bytes and was as fast as ring at every N measured (1-16,
# benchmarks/scaling.py); across nodes the generator's link and work decide, and the cost
# model (benchmarks/cost_model.py) has ring ahead from N = 3 on 10-100 Gbit/s links.
RING_FROM_N = 4
REDUCE_TOPOLOGY = Option("reduce_topology", "--reduce-topology",
                         "who reduces the gradients: the generator all N copies (star), or the workers first, "
                         "each one chunk of every copy (ring: the generator's work stays one model's worth)",
                         type=str, choices=("star", "ring"),
                         default_text=f"star; with --comms mpi, ring from -n {RING_FROM_N}")


def reduce_topology(cfg) -> str:
    """The topology: given, or chosen by where the run is and N (N may be set by an MPI launch after parsing)."""
    if cfg.reduce_topology is not None:
        return cfg.reduce_topology
    if cfg.wire_dtype == "int8":  # its rounding is carried over on the generator's side of star
        return "star"
    return "ring" if cfg.comms == "mpi" and cfg.n_workers >= RING_FROM_N else "star"


def exchange_layout(buckets, cfg) -> Layout:
    """How sync's exchange is cut: a chunk per worker of every bucket with ring, one with star."""
    return Layout(buckets, cfg.n_workers if reduce_topology(cfg) == "ring" else 1)


@dataclass
class SyncCounters(Counters):
    skipped: int = 0  # non-finite gradients left out (--on-nonfinite skip)


class Sync(Strategy):
    # A pipeline's generator (libe_cnn/strategies/pipeline.py) is this one with these four methods of its own.
    def senders(self, cfg) -> Senders:
        """Whose gradients the generator reduces: every worker's."""
        return Senders(cfg.n_workers)

    def run_generator(self, run) -> None:
        plan, n, parent, state = run.plan, run.n, run.parent, run.state
        counters: SyncCounters = state.counters
        total = plan.total_steps
        layout, senders = exchange_layout(parent.buckets, run.cfg), self.senders(run.cfg)
        for bucket in forward_order(parent.buckets):
            publish(run, layout, senders, state.step, bucket)
        # Rows go one step ahead: a worker finds its next row waiting when it sends this one.
        for step in range(state.step, min(state.step + 2, total)):
            run.send(n, step)
        while state.step < total:
            step = state.step
            cpu = time.thread_time()
            got = reduce_step(run, step, layout, senders)
            if got is None:
                break  # the manager ends the run early (an exit criterion or an error)
            t0 = time.perf_counter()
            published = Publisher(run, layout, senders, step + 1 if step + 1 < total else None)
            if got.good:
                parent.step_by_bucket(published)
            else:  # with every gradient skipped, the parent stays as it is
                for bucket in forward_order(parent.buckets):
                    published(bucket)
            counters.skipped += senders.copies - len(got.good)
            state.advance(1, senders.copies * run.cfg.batch_size, float(np.mean(got.losses)), plan.steps_per_epoch)
            state.positions = [state.step] * n
            # The step is taken: a failure from here on keeps it, a failed publish included.
            run.completed()
            published.raise_error()
            t2, cpu = time.perf_counter(), time.thread_time() - cpu
            t1 = t2 - published.seconds
            rows = run.gather(fetch=False, evict=False, version=step)
            if rows is not None:
                # Every worker has finished the step: its parameters and gradients are no longer needed.
                run.servers.evict(params_keys(run, layout, step) + got.keys)
                if step + 2 < total:
                    run.send(n, step + 2)
            # Stopped before every worker reported it, the step is taken all the same, and recorded
            # without the workers' timings.
            run.record(rows.rows if rows is not None else np.zeros(0, run.messages.sim_rows),
                       nonfinite=senders.copies - len(got.good), gen_wait_s=got.wait_s + (rows.wait_s if rows else 0.0),
                       fetch_s=got.fetch_s, update_s=got.reduce_s + t1 - t0, publish_s=t2 - t1,
                       exposed_s=(published.first_at or t2) - got.last_arrival, gen_cpu_s=cpu,
                       **(self.step_fields(run.cfg, rows.rows) if rows is not None else {}))
            if rows is None:
                break
            run.evaluate_and_checkpoint_if_due(state.step)
        # Also when the run was stopped early: every worker redoes the step it was on (what is
        # left in the store goes with the run's keys at its end).
        run.checkpoint()
        run.finish(nonfinite_skipped=counters.skipped, reduce_topology=reduce_topology(run.cfg),
                   **self.summary_fields(run.cfg))

    def step_fields(self, cfg, rows: np.ndarray) -> dict:
        """What a step's metrics record adds from the workers' rows."""
        return {}

    def summary_fields(self, cfg) -> dict:
        """What summary.json adds."""
        return {}

    def run_worker(self, worker, ps, row: np.void, out_dtype) -> None:
        worker.streamed_gradient_loop(ps, row, out_dtype)


STRATEGY = Sync(
    "sync", "every step, the sum (or mean) of all workers' gradients, one optimizer step",
    options=(REDUCE, BUCKET_MB, REDUCE_TOPOLOGY), parent_optimizer=True, skips_nonfinite=True, counters=SyncCounters,
    combines_pipelines=True, int8_wire=True,
)

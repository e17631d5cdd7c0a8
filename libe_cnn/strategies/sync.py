"""sync: every step, one gradient per worker -> reduce in shard order -> one optimizer step.

Synchronous parallel SGD, the all-reduce of DDP (Dean et al. 2012; Goyal et al. 2017), with
DDP's overlap: the exchange is streamed in buckets (libe_cnn/stream.py). Each bucket of the
workers' gradients is fetched, screened and reduced as soon as all N copies are there, while
the workers' backward goes on; the last bucket completes the step, and the new parameters are
published bucket by bucket, the first layers' first, for the workers' next forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from libe_cnn.buckets import forward_order
from libe_cnn.stream import Publisher, params_keys, publish, reduce_step
from libe_cnn.strategies.base import Counters, Option, Strategy

REDUCE = Option("reduce", "--reduce", "combine the workers' gradients by sum or mean", default="sum", type=str,
                choices=("sum", "mean"))
# fc1 of the MNIST CNN (4.5 MiB) is one bucket and the convolutions (75 KiB) another at any size
# from 0.1 to 4.5; 1 MiB is DDP's first bucket.
BUCKET_MB = Option("bucket_mb", "--bucket-mb", "gradients and parameters travel in buckets of about this size",
                   default=1.0, type=float, metavar="MB",
                   check=lambda v, n: None if v > 0 else f"--bucket-mb must be positive (got {v})")


@dataclass
class SyncCounters(Counters):
    skipped: int = 0  # non-finite gradients left out (--on-nonfinite skip)


class Sync(Strategy):
    def run_generator(self, run) -> None:
        plan, n, parent, state = run.plan, run.n, run.parent, run.state
        counters: SyncCounters = state.counters
        total = plan.total_steps
        for bucket in forward_order(parent.buckets):
            publish(run, state.step, bucket)
        # Rows go one step ahead: a worker finds its next row waiting when it sends this one.
        for step in range(state.step, min(state.step + 2, total)):
            run.send(n, step)
        while state.step < total:
            step = state.step
            got = reduce_step(run, step)
            if got is None:
                break  # the manager ends the run early (an exit criterion or an error)
            t0 = time.perf_counter()
            published = Publisher(run, step + 1 if step + 1 < total else None)
            if got.good:
                parent.step_by_bucket(published)
            else:  # with every gradient skipped, the parent stays as it is
                for bucket in forward_order(parent.buckets):
                    published(bucket)
            counters.skipped += n - len(got.good)
            state.advance(1, n * run.cfg.batch_size, float(np.mean(got.losses)), plan.steps_per_epoch)
            state.positions = [state.step] * n
            # The step is taken: a failure from here on keeps it, a failed publish included.
            run.completed()
            published.raise_error()
            t2 = time.perf_counter()
            t1 = t2 - published.seconds
            rows = run.gather(fetch=False, evict=False, version=step)
            if rows is not None:
                # Every worker has finished the step: its parameters and gradients are no longer needed.
                run.store.evict(params_keys(run, step) + got.keys)
                if step + 2 < total:
                    run.send(n, step + 2)
            # Stopped before every worker reported it, the step is taken all the same, and recorded
            # without the workers' timings.
            run.record(rows.rows if rows is not None else np.zeros(0, run.messages.sim_rows),
                       nonfinite=n - len(got.good), gen_wait_s=got.wait_s + (rows.wait_s if rows else 0.0),
                       fetch_s=got.fetch_s, update_s=got.reduce_s + t1 - t0, publish_s=t2 - t1,
                       exposed_s=(published.first_at or t2) - got.last_arrival)
            if rows is None:
                break
            run.evaluate_and_checkpoint_if_due(state.step)
        # Also when the run was stopped early: every worker redoes the step it was on (what is
        # left in the store goes with the run's keys at its end).
        run.checkpoint()
        run.finish(nonfinite_skipped=counters.skipped)

    def run_worker(self, worker, ps, row: np.void, out_dtype) -> None:
        worker.streamed_gradient_loop(ps, row, out_dtype)


STRATEGY = Sync(
    "sync", "every step, the sum (or mean) of all workers' gradients, one optimizer step",
    options=(REDUCE, BUCKET_MB), parent_optimizer=True, skips_nonfinite=True, counters=SyncCounters,
)

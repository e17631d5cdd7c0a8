"""sync: every step, one gradient per worker -> reduce in shard order -> one optimizer step.

Synchronous parallel SGD, the all-reduce of DDP (Dean et al. 2012; Goyal et al. 2017).
The new parameters are put once and their key sent to all N workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from libe_cnn.strategies.base import Counters, Option, Strategy

REDUCE = Option("reduce", "--reduce", "combine the workers' gradients by sum or mean", default="sum", type=str,
                choices=("sum", "mean"))


@dataclass
class SyncCounters(Counters):
    skipped: int = 0  # non-finite gradients left out (--on-nonfinite skip)


class Sync(Strategy):
    def run_generator(self, run) -> None:
        plan, n, parent, state = run.plan, run.n, run.parent, run.state
        counters: SyncCounters = state.counters
        params_key = run.store.put(parent.params_for_wire())
        run.send(n, state.step, params_key=params_key)
        while state.step < plan.total_steps:
            got = run.gather(fetch=True, evict=True)
            if got is None:
                break  # the manager ends the run early (an exit criterion or an error)
            # Every simulator has loaded these parameters: the store holds at most one step.
            run.store.evict([params_key])
            t2 = time.perf_counter()
            bad = run.screen(got.results, got.rows, state.step + 1, "gradient")
            good = [g for i, g in enumerate(got.results) if i not in bad]
            if good:  # with every gradient skipped, the parent stays as it is
                parent.apply(good, run.cfg.reduce)
            counters.skipped += len(bad)
            t3 = time.perf_counter()
            state.advance(1, int(got.rows["n_samples"].sum()), float(got.rows["loss"].mean()), plan.steps_per_epoch)
            state.positions = [state.step] * n
            # The step is taken: a failure from here on keeps it (the publish goes to the store).
            run.completed()
            if state.step < plan.total_steps:
                # Publish before any bookkeeping: the simulators are waiting for it.
                params_key = run.store.put(parent.params_for_wire())
                run.send(n, state.step, params_key=params_key)
            t4 = time.perf_counter()
            run.record(got.rows, nonfinite=len(bad), gen_wait_s=got.wait_s, fetch_s=got.fetch_s,
                       update_s=t3 - t2, publish_s=t4 - t3)
            run.evaluate_and_checkpoint_if_due(state.step)
        # Also when the run was stopped early: every worker redoes the step it was on.
        run.checkpoint()
        run.finish(nonfinite_skipped=counters.skipped)


STRATEGY = Sync(
    "sync", "every step, the sum (or mean) of all workers' gradients, one optimizer step",
    options=(REDUCE,), parent_optimizer=True, skips_nonfinite=True, counters=SyncCounters,
)

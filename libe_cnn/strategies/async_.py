"""async: an asynchronous parameter server; each gradient is applied the moment it arrives.

Downpour SGD (Dean et al. 2012), Hogwild! (Recht et al. 2011); bounded staleness as in SSP
(Ho et al. 2013). Only the sender of a gradient gets fresh parameters; the others keep
computing. Steps here count single gradients: the samples of N sync steps take N x the steps.
A gradient computed on parameters more than --max-staleness updates old is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from libe_cnn.strategies.base import Counters, Option, Strategy

MAX_STALENESS = Option(
    "max_staleness", "--max-staleness", "drop a gradient computed on parameters more than S updates old",
    metavar="S", default_text="use every gradient",
    check=lambda v, n: None if v >= 0 else f"--max-staleness must be at least 0 (got {v})")


def staleness_weight(staleness: int, max_staleness: int | None) -> float:
    """Weight of a gradient computed `staleness` updates ago: 1, or 0 to drop it.

    Dropping (rather than down-weighting) keeps the optimizer's step size meaningful: a
    gradient either counts fully or not at all, and the drops are counted in the metrics.
    """
    if staleness < 0:
        raise ValueError(f"negative staleness {staleness}")
    return 1.0 if max_staleness is None or staleness <= max_staleness else 0.0


@dataclass
class AsyncCounters(Counters):
    version: int = 0  # optimizer steps taken by the parent
    dropped: int = 0  # gradients too stale to apply
    skipped: int = 0  # non-finite gradients left out
    staleness_sum: int = 0
    staleness_max: int = 0


class Async(Strategy):
    def done_detail(self, summary: dict) -> str:
        detail = f"{summary['updates']} applied, {summary['dropped']} dropped as stale"
        return detail + (f", {summary['nonfinite_skipped']} non-finite" if summary["nonfinite_skipped"] else "")

    def run_generator(self, run) -> None:
        plan, n, parent, state, cfg = run.plan, run.n, run.parent, run.state, run.cfg
        c: AsyncCounters = state.counters
        total = run.total_steps
        epoch_steps = n * plan.steps_per_epoch  # gradients per epoch
        # Parameter versions sent and not yet loaded by every worker they went to: [key, workers].
        outstanding: dict[int, list] = {c.version: [run.store.put(parent.params_for_wire()), n]}
        run.send(n, c.version, params_key=outstanding[c.version][0])
        in_flight = n  # rows sent and not yet answered
        pending = None  # rows received and not yet handled
        while state.step < total:
            t0 = time.perf_counter()
            if pending is None or len(pending) == 0:
                received = run.receive()
                if received is None:
                    break
                in_flight -= len(received)
                run.store.evict([str(k) for k in received["result_key"][total - state.step:]])  # beyond the budget
                pending = received[: total - state.step]
            # Handle rows only up to the next evaluation or checkpoint, so that both see the parent
            # exactly at that step, whatever number of results arrived together.
            cut = next((k for k in range(1, len(pending)) if run.stops_at(state.step + k)), len(pending))
            rows, pending = pending[:cut], pending[cut:]
            t1 = time.perf_counter()
            keys = [str(k) for k in rows["result_key"]]
            grads = run.fetch(keys)
            run.store.evict(keys)
            t2 = time.perf_counter()
            bad = run.screen(grads, rows["shard"], state.step + 1, "gradient")
            records = []
            for i, (row, grad) in enumerate(zip(rows, grads)):
                staleness = c.version - int(row["version"])
                used = staleness_weight(staleness, cfg.max_staleness) > 0 and i not in bad
                if used:
                    parent.apply([grad], "sum")
                    c.version += 1
                c.skipped += i in bad
                c.dropped += not used and i not in bad
                # A worker has answered from this version, so it has loaded it.
                outstanding[int(row["version"])][1] -= 1
                if outstanding[int(row["version"])][1] == 0:
                    run.store.evict([outstanding.pop(int(row["version"]))[0]])
                state.positions[int(row["shard"])] += 1
                c.staleness_sum += staleness
                c.staleness_max = max(c.staleness_max, staleness)
                state.advance(1, int(row["n_samples"]), float(row["loss"]), epoch_steps)
                records.append(dict(step=state.step, epoch=state.epoch, samples=state.samples, loss=state.loss,
                                    staleness=staleness, dropped=not used and i not in bad, nonfinite=i in bad))
            for record in records:
                record["version"] = c.version  # the parent's version once this batch is applied
            t3 = time.perf_counter()
            run.completed()  # these gradients are taken: a failure from here on keeps them
            if state.step < total:
                # Only the workers that just answered are waiting; each gets the newest parameters
                # (already in the store if every gradient of this batch was dropped).
                if c.version not in outstanding:
                    outstanding[c.version] = [run.store.put(parent.params_for_wire()), 0]
                outstanding[c.version][1] += len(rows)
                run.send(len(rows), c.version, params_key=outstanding[c.version][0])
                in_flight += len(rows)
            t4 = time.perf_counter()
            share = 1.0 / len(rows)  # the generator's time is split evenly over the rows it handled
            for i, record in enumerate(records):
                run.record(rows[i : i + 1], **record, gen_wait_s=(t1 - t0) * share, fetch_s=(t2 - t1) * share,
                           update_s=(t3 - t2) * share, publish_s=(t4 - t3) * share)
            run.evaluate_and_checkpoint_if_due(state.step)
        # Wait for the gradients still being computed, as sync does: libEnsemble may start the
        # generator again if it ends while simulators are busy. They are not applied.
        while state.step == total and in_flight > 0:
            rows = run.receive()
            if rows is None:
                break
            run.store.evict([str(k) for k in rows["result_key"]])
            in_flight -= len(rows)
        # Gradients in flight when the run was stopped are computed again after a resume.
        run.checkpoint()
        run.finish(updates=c.version, dropped=c.dropped, nonfinite_skipped=c.skipped,
                   mean_staleness=c.staleness_sum / max(state.step, 1), max_staleness_seen=c.staleness_max)


STRATEGY = Async(
    "async", "each gradient applied as it arrives; only its sender gets fresh parameters",
    options=(MAX_STALENESS,), parent_optimizer=True, skips_nonfinite=True, counts_gradients=True,
    counters=AsyncCounters,
)

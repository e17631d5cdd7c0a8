"""ring-allreduce: every step each worker ends with the mean gradient of all N and applies the
same optimizer step itself; the generator only coordinates, evaluates and checkpoints.

The decentralized counterpart of the parameter server (Patarasuk and Yuan 2009; Horovod,
Sergeev and Del Balso 2018): a reduce-scatter (each worker reduces one chunk of every
bucket, in shard order: the chunk reducers of sync's ring topology, libe_cnn/stream.py)
then an all-gather (every worker reads every reduced chunk), both through the store. No
parameters travel: the workers start from the same model and apply the same bits, so they
stay identical. Worker 1 sends its parameters and optimizer state when the generator is to
evaluate or checkpoint. A non-finite gradient stops every worker before its step.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from libe_cnn.flat import copy_into
from libe_cnn.store import ServerGroup
from libe_cnn.strategies.base import Strategy
from libe_cnn.strategies.sync import BUCKET_MB
from libe_cnn.stream import Layout, reduced_for
from libe_cnn.waits import POLL_S, wait_for
from libe_cnn.stream_generator import read_reduced, step_keys


def gather_reduced(servers: ServerGroup, shard: int, layout: Layout, step: int, flat: torch.Tensor,
                   stopped) -> list[int]:
    """The all-gather: every reduced chunk of `step` into `flat`, as the owners announce them;
    returns the workers they found non-finite. Raises Stopped."""
    control = servers.stores[0]
    pending = {(b.index, c) for b in layout.buckets for c in range(layout.n_chunks)}
    bad: set[int] = set()
    while pending:
        tokens = wait_for(lambda: control.next_tokens(reduced_for(shard), POLL_S) or None, stopped)
        nonfinite, _ = read_reduced(servers, layout, step, tokens, pending,
                                           lambda start, stop, array: copy_into(flat[start:stop], array))
        bad.update(nonfinite)
    return sorted(bad)


class RingAllreduce(Strategy):
    def run_generator(self, run) -> None:
        plan, n, parent, state, cfg = run.plan, run.n, run.parent, run.state, run.cfg
        total = plan.total_steps
        layout = Layout(parent.buckets, n)

        def send(step: int, params_key: str = "") -> None:
            # Worker 1 sends its state with the step after which the generator evaluates or checkpoints.
            run.send(n, step, params_key=params_key, checkpoint=run.stops_at(step + 1))

        from libe_cnn.plan import resume_key  # the plan imports the strategies

        if run.resumed:  # every worker's own state, as the checkpoint holds it
            sent = [run.store.put(saved.numpy(), resume_key(s)) for s, saved in enumerate(run.resumed["workers"])]
        else:  # everyone starts from the parent
            sent = [run.store.put(parent.params_for_wire())]
        send(state.step, "" if run.resumed else sent[0])
        if state.step + 1 < total:
            send(state.step + 1)
        while state.step < total:
            step = state.step
            got = run.gather(fetch=False, evict=False, version=step)
            if got is None:
                break  # a stopped run keeps its last checkpoint: the workers' state is not here
            run.store.evict(sent)
            sent = []
            bad = sorted({int(s) for row in got.rows for s in str(row["nonfinite_from"]).split(",") if s})
            run.messages.nonfinite(bad, step + 1, "gradient")
            if step + 2 < total:
                send(step + 2)
            # Every worker has read the step's reduced chunks.
            run.servers.evict(step_keys(run.servers, layout, step))
            state.advance(1, n * cfg.batch_size, float(got.rows["loss"].mean()), plan.steps_per_epoch)
            state.positions = [state.step] * n
            t0 = time.perf_counter()
            saved = None
            if got.rows["state_key"][0]:
                key = str(got.rows["state_key"][0])
                saved = run.store.get(key)
                run.store.evict([key])
                parent.host_params[:] = saved[: parent.host_params.size]
                parent.host_params_changed()
            run.completed()
            run.record(got.rows, gen_wait_s=got.wait_s, fetch_s=time.perf_counter() - t0, update_s=0.0, publish_s=0.0)
            run.evaluate_and_checkpoint_if_due(state.step)
            if saved is not None and run.checkpoint_due(state.step):
                run.outcome.checkpoint_completed(workers=[np.asarray(saved)] * n)  # the workers are identical
        run.store.evict(sent)
        run.finish()

    def run_worker(self, worker, ps, row: np.void, out_dtype) -> None:
        worker.allreduce_loop(ps, row, out_dtype)


STRATEGY = RingAllreduce(
    "ring-allreduce", "every step, the workers' mean gradient by reduce-scatter and all-gather among themselves; "
    "each worker steps", options=(BUCKET_MB,), workers_keep_state=True,
)

"""diloco: H local steps of each worker's own optimizer, then an outer optimizer steps the parent.

DiLoCo (Douillard et al. 2023): every --sync-period steps the generator forms the
pseudo-gradient parent - mean(workers) (the mean in shard order) and takes one step of SGD
with Nesterov momentum on it; the workers start the next round from the new parent and keep
their own inner optimizer's state. With --outer-lr 1 and --outer-momentum 0 it is param-avg.

With --wire-dtype int8 each worker sends its own pseudo-gradient (where it started minus
where it ended) in int8 with error feedback, and the parent goes out as its int8 change from
what the workers hold (libe_cnn/wire.py); rounds that end at a checkpoint, and the first,
travel whole, so that resuming stays bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from libe_cnn.strategies.base import SYNC_PERIOD, Option, Periodic, average_parameters

# Measured on the seed CNN, Fashion-MNIST, N=2 x 64, one epoch (python -m benchmarks.diloco): at H = 32 the
# paper's outer lr 0.7 and momentum 0.9 did best (89.3%, sync 89.0%) on 1/28 of sync's bytes.
INNER_STEPS = dataclasses.replace(
    SYNC_PERIOD, help="inner steps between outer steps", default=32,
    warn=lambda v, n: None if v > 1 else (
        "--sync-period 1 gives diloco one inner step per round, so the outer optimizer steps after every batch "
        "on top of each worker's own: it trains worse than --strategy sync; diloco is meant for rounds of 8 "
        "steps or more (default 32)"))
OUTER_LR = Option("outer_lr", "--outer-lr", "the outer optimizer's learning rate", default=0.7, type=float,
                  metavar="LR", check=lambda v, n: None if 0 < v <= 2 else f"--outer-lr must be in (0, 2] (got {v})")
OUTER_MOMENTUM = Option(
    "outer_momentum", "--outer-momentum", "the outer optimizer's Nesterov momentum (0: none)", default=0.9,
    type=float, metavar="M", check=lambda v, n: None if 0 <= v < 1 else f"--outer-momentum must be in [0, 1) (got {v})")


def pseudo_gradient(parent: np.ndarray, workers, out: np.ndarray) -> np.ndarray:
    """parent - mean(workers), the mean taken in the given order, written into `out`."""
    average_parameters(workers, out)
    np.subtract(parent, out, out=out)
    return out


class Diloco(Periodic):
    def make_parent_optimizer(self, cfg, params: list):
        import torch

        # Nesterov needs a momentum; without one the outer step is plain SGD.
        return torch.optim.SGD(params, lr=cfg.outer_lr, momentum=cfg.outer_momentum,
                               nesterov=cfg.outer_momentum > 0)

    def update_parent(self, cfg, parent, results) -> None:
        if cfg.wire_dtype == "int8":  # the workers sent their own pseudo-gradients
            parent.outer_step(lambda grad: average_parameters(results, grad))
        else:
            parent.outer_step(lambda grad: pseudo_gradient(parent.host_params, results, grad))

    def round_keys(self, run, start: int, exchanges: int) -> tuple[str, str]:
        parent = run.parent
        if parent.workers_copy is None:
            return super().round_keys(run, start, exchanges)
        exact = not parent.workers_copy.sent_any or run.plan.checkpoint_at(start)
        return run.store.put(parent.slice_for_wire(0, parent.flat_params.numel(), exact)), ""

    # --- the simulator's side, int8 ---

    def receive(self, worker, row, t, memo) -> None:
        if worker.cfg.wire_dtype != "int8":
            return super().receive(worker, row, t, memo)
        from libe_cnn.wire import ErrorFeedback, receive_parameters

        if "held" not in memo:
            memo["held"] = np.zeros(worker.flat_params.numel(), np.float32)
            memo["feedback"] = ErrorFeedback(len(memo["held"]))
        receive_parameters(memo["held"], worker.store.get(str(row["params_key"])), "int8")
        worker.set_params(memo["held"])

    def result_for_wire(self, worker, row, memo) -> np.ndarray:
        if worker.cfg.wire_dtype != "int8":
            return super().result_for_wire(worker, row, memo)
        from libe_cnn.flat import host_array

        moved = memo["held"] - host_array(worker.flat_params)
        return memo["feedback"].encode(0, len(moved), moved, exact=bool(row["checkpoint"]))


STRATEGY = Diloco("diloco", "K local steps of each worker's optimizer, then an outer Nesterov step on the parent",
                  options=(INNER_STEPS, OUTER_LR, OUTER_MOMENTUM), parent_optimizer=True, int8_wire=True)

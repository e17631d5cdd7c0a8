"""What a strategy is: its options, its rules, and the two halves of its loop.

A strategy module defines one `Strategy` (or `Periodic`) instance named STRATEGY; the
registry (libe_cnn/strategies/__init__.py) lists them. The command line, the config checks,
the generator and the simulators all ask the strategy, never compare its name.

The loops run on objects the generator and the simulators pass in (`run`, a GenRun, and
`worker`, a ChildWorker), so that this package imports neither of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from libe_cnn.reduction import reduce_in_order


@dataclass(frozen=True)
class Option:
    """A command-line option that only some strategies take: its default, help and check."""

    name: str  # the TrainConfig field
    flag: str
    help: str
    default: Any = None  # filled in when the strategy takes the option and it is not given
    type: Callable = int
    choices: tuple | None = None
    metavar: str | None = None
    # (value, number of workers) -> the error message, or None when the value is fine.
    check: Callable[[Any, int], str | None] | None = None
    # (value, number of workers) -> a warning for a value that is allowed but rarely what was meant.
    warn: Callable[[Any, int], str | None] | None = None
    default_text: str | None = None  # the default as the help states it, when not a constant


@dataclass
class Counters:
    """A strategy's running totals: saved in every checkpoint, restored on resume."""

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class NoCounters(Counters):
    pass


@dataclass
class RoundCounters(Counters):
    exchanges: int = 0  # rounds that exchanged something


@dataclass
class Strategy:
    """One way to combine the workers' work."""

    name: str
    summary: str  # one line for --help
    options: tuple[Option, ...] = ()
    # The generator keeps an optimizer of its own for the parent (it applies gradients).
    parent_optimizer: bool = False
    # Exchanges go between workers: one worker alone has no one to exchange with.
    needs_peers: bool = False
    # A non-finite contribution can be left out and the run go on (--on-nonfinite skip).
    skips_nonfinite: bool = False
    # Takes --wire-dtype int8: each worker's gradient and the parameters' changes go whole through
    # the generator every step, so that the rounding can be carried over (libe_cnn/wire.py).
    int8_wire: bool = False
    # One recorded step is one gradient (N per round of batches) instead of one batch on every worker.
    counts_gradients: bool = False
    # Each worker keeps parameters and optimizer state of its own, which checkpoints must hold.
    workers_keep_state: bool = False
    # Combines the gradients of the replicas of a pipeline too (--parallelism pipeline).
    combines_pipelines: bool = False
    # Evaluating the parent ends a round early (the workers' models are combined for it), so
    # evaluations change the math: by default there are none besides the epoch ends.
    rounds_end_at_evaluations: bool = False
    counters: type[Counters] = field(default=NoCounters)

    @property
    def step_unit(self) -> str:
        return "gradient" if self.counts_gradients else "step"

    def option(self, name: str) -> Option | None:
        """This strategy's version of the option in TrainConfig field `name`, or None if it takes none.

        Strategies may share a field and flag with checks, defaults and help of their own
        (easgd's and elastic-gossip's --elastic-alpha).
        """
        return next((o for o in self.options if o.name == name), None)

    def recorded_per_step(self, n_workers: int) -> int:
        """Recorded steps in one step of one batch on every worker: N single gradients, or 1."""
        return n_workers if self.counts_gradients else 1

    def recorded_steps(self, steps: int, n_workers: int) -> int:
        """The run's length in the steps its metrics and checkpoints count."""
        return steps * self.recorded_per_step(n_workers)

    def done_detail(self, summary: dict) -> str:
        """What the final line adds after the step count, from summary.json."""
        return ""

    def make_parent_optimizer(self, cfg, params: list):
        """An optimizer of the strategy's own for the parent, or None: the run's --optimizer and --lr."""
        return None

    def run_generator(self, run) -> None:
        raise NotImplementedError

    def run_worker(self, worker, ps, row: np.void, out_dtype) -> None:
        """A simulator's loop: by default, one gradient per message (sync, async)."""
        worker.gradient_loop(ps, row, out_dtype)


@dataclass
class Periodic(Strategy):
    """Workers take local optimizer steps; every round the generator combines their parameters.

    The round loops live with the generator (GenRun.rounds) and the simulator
    (ChildWorker.local_rounds); the hooks below are what differs between strategies.
    """

    workers_keep_state: bool = True
    rounds_end_at_evaluations: bool = True
    counters: type[Counters] = field(default=RoundCounters)
    # The workers' models are needed every round, not only to evaluate the parent.
    combines_every_round: bool = True
    # The generator counts every round after the first as an exchange. False: no round exchanges
    # anything (local: it only evaluates), or the strategy counts its own in round_keys (gossip,
    # whose pairs may all sit a round out).
    exchanges: bool = True

    def round_end_limit(self, cfg, start: int, total: int) -> int:
        """The latest step at which a round that starts at `start` ends."""
        return min(start + cfg.sync_period, total)

    def round_keys(self, run, start: int, exchanges: int) -> tuple[str, str]:
        """Put what a round starts from; returns (params_key, peers_key) for the workers' rows."""
        return run.store.put(run.parent.params_for_wire()), ""

    def combine(self, cfg, parent: np.ndarray, results: list[np.ndarray] | None) -> None:
        """The new parent from the workers' parameters, in place (results: shard order)."""
        raise NotImplementedError

    def update_parent(self, cfg, parent, results: list[np.ndarray]) -> None:
        """Change the ParentModel `parent` by the workers' parameters: by `combine` by default."""
        self.combine(cfg, parent.host_params, results)
        parent.host_params_changed()

    def keeps_results(self) -> bool:
        """The workers read each other's results next round: keep them until then."""
        return False

    def final_evaluation(self, run, results: list[np.ndarray]) -> dict:
        """Extra fields of the last evaluation."""
        return {}

    def resume_puts(self, run, step: int, shard: int, state) -> list[str]:
        """Resuming: what else a worker reads in its first round besides its own state."""
        return []

    # --- the simulator's side ---

    def receive(self, worker, row: np.void, t: int, memo: dict) -> None:
        """Apply the generator's answer at the start of a round (t: local steps done so far)."""
        if row["params_key"]:
            worker.load_into_model(str(row["params_key"]))

    def result_name(self, t: int, shard: int) -> str | None:
        """The store name of a worker's parameters after t local steps (None: a fresh key)."""
        return None

    def result_for_wire(self, worker, row: np.void, memo: dict) -> np.ndarray:
        """What a worker sends at a round's end: its parameters, in the wire type."""
        from libe_cnn.wire import to_wire  # torch: not needed to parse the command line

        return to_wire(worker.flat_params, worker.cfg.wire_dtype)

    def after_put(self, worker, memo: dict) -> None:
        """What a worker does once its parameters are sent."""

    def run_generator(self, run) -> None:
        run.rounds(self)

    def run_worker(self, worker, ps, row: np.void, out_dtype) -> None:
        worker.local_rounds(ps, row, out_dtype, self)


SYNC_PERIOD = Option("sync_period", "--sync-period", "local steps between exchanges", default=4, metavar="K",
                     check=lambda v, n: None if v >= 1 else f"--sync-period must be at least 1 (got {v})")


def average_parameters(params, out: np.ndarray) -> np.ndarray:
    """The workers' mean model, written into `out`."""
    return reduce_in_order(params, out, "mean")

"""Where the run is and what it reports: the loop's state, metrics.jsonl, evaluations, progress."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gen_funcs.parent import ParentModel
from gen_funcs.stats import RunStats
from libe_cnn.plan import RunPlan
from libe_cnn.progress import Progress
from libe_cnn.rundir import MetricsLog
from libe_cnn.tensorboard_log import TensorBoardLog
from libe_cnn.runtime import rss_mb
from libe_cnn.strategies.base import Counters


@dataclass
class LoopState:
    """The loop's running values after its last step: what a checkpoint saves and resume restores."""

    step: int = 0  # steps recorded (some strategies count single gradients)
    epoch: int = 0
    samples: int = 0
    loss: float = math.nan
    positions: list[int] = field(default_factory=list)  # each worker's next batch
    counters: Counters | None = None  # the strategy's own running totals

    def advance(self, steps: int, samples: int, loss: float, steps_per_epoch: int) -> None:
        self.step += steps
        self.epoch = (self.step - 1) // steps_per_epoch
        self.samples += samples
        self.loss = loss

    def saved(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "samples": self.samples, "loss": self.loss,
                "positions": list(self.positions), "counters": self.counters.as_dict()}

    @classmethod
    def fresh(cls, plan: RunPlan) -> LoopState:
        return cls(positions=[0] * plan.config.n_workers, counters=plan.strategy.counters())

    @classmethod
    def restored(cls, plan: RunPlan, checkpoint: dict) -> LoopState:
        return cls(step=checkpoint["step"], epoch=checkpoint["epoch"], samples=checkpoint["samples"],
                   loss=checkpoint["loss"], positions=[int(p) for p in checkpoint["positions"]],
                   counters=plan.strategy.counters(**checkpoint["counters"]))


class Recorder:
    """metrics.jsonl, the evaluations of the parent, the progress line and the run's statistics."""

    def __init__(self, plan: RunPlan, parent: ParentModel, state: LoopState, test: tuple[torch.Tensor, torch.Tensor],
                 keep_lines: int | None, start: float) -> None:
        self.plan, self.parent, self.state = plan, parent, state
        self.test_x, self.test_y = test
        self.run_dir = Path(plan.config.run_dir)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep=keep_lines)
        cfg = plan.config
        self.board = TensorBoardLog(cfg.tensorboard, resumed_at=state.step) if cfg.tensorboard else None
        # Between epoch ends, a fixed subset of the test set: a curve for little time.
        subset = cfg.eval_subset or len(self.test_y)
        self.test_subset = (self.test_x[:subset], self.test_y[:subset])
        self.stats = RunStats()
        self.start = start
        self.last_eval: dict | None = None
        self.last_record: dict | None = None
        self.progress = Progress(plan.recorded_steps, unit=plan.step_unit, done=state.step)
        # About ten evaluation lines a run on the screen, however often it evaluates (metrics.jsonl
        # has every one): a long list would push the header and the progress line out of sight.
        self.show_every = -(-plan.recorded_steps // 10)
        self.shown_step: int | None = None
        # Evaluations and checkpoints fall where a sync step would end: every N recorded steps
        # where one counts single gradients.
        self.per_step = plan.strategy.recorded_per_step(plan.config.n_workers)

    def due(self, step: int, every: int | None) -> bool:
        """At every epoch end, every `every` steps and at the last step."""
        return step % self.per_step == 0 and self.plan.due(step // self.per_step, every)

    def eval_due(self, step: int) -> bool:
        return self.due(step, self.plan.eval_every)

    def test_set(self, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """What an evaluation now tests on: the whole test set at epoch ends and the last step
        (and when `whole`), else the subset."""
        return (self.test_x, self.test_y) if whole or self.due(self.state.step, None) else self.test_subset

    def log(self, record: dict) -> None:
        self.metrics.write(**record)
        if self.board is not None:
            self.board.write(record)

    def record(self, rows: np.ndarray, **fields) -> dict:
        """Write one metrics record of the current state (fields may override it), with the
        simulators' timings from `rows`, and show progress."""
        s = self.state
        record = {"step": s.step, "epoch": s.epoch, "loss": s.loss, "samples": s.samples,
                  "wall_s": time.perf_counter() - self.start, **fields}
        # The generator's work that the workers wait for: all of it, unless the strategy streams (sync).
        record.setdefault("exposed_s", record["fetch_s"] + record["update_s"] + record["publish_s"])
        # (No rows: the run was stopped before the workers reported a step it had taken.)
        record.update({f"sim_{name}": float(rows[name].mean()) if len(rows) else 0.0
                       for name in ("load_s", "compute_s", "put_s", "wait_s", "exchange_s")})
        record.update(manager_rss_mb=rss_mb(), sim_rss_mb=float(rows["rss_mb"].max()) if len(rows) else 0.0)
        record["samples_per_s"] = record["samples"] / record["wall_s"]  # since the start, as the progress line shows
        self.log(record)
        self.last_record = record
        self.stats.step(record)
        self.progress.update(record["step"], record["epoch"], record["loss"],
                             self.last_eval["test_accuracy"] if self.last_eval else None, record["samples_per_s"])
        return record

    def evaluate(self, whole: bool = False, **extra) -> dict:
        """Test the parent model as it is at the current step, save it, and log the result
        (`whole`: on the whole test set, as a run's last evaluation always is)."""
        s = self.state
        t0 = time.perf_counter()
        test_x, test_y = self.test_set(whole)
        test_loss, test_acc = self.parent.evaluate(test_x, test_y)
        self.parent.save(self.run_dir / "model.pt")
        eval_s = time.perf_counter() - t0
        record = {"event": "eval", "step": s.step, "epoch": s.epoch, "samples": s.samples, "test_loss": test_loss,
                  "test_accuracy": test_acc, "test_samples": len(test_y), **extra, "eval_s": eval_s,
                  "wall_s": time.perf_counter() - self.start}
        self.log(record)
        line = (f"epoch {s.epoch + 1} {self.plan.step_unit} {s.step}: test loss {test_loss:.4f}, "
                f"test accuracy {test_acc:.2%}")
        if len(test_y) < len(self.test_y):
            line += f" (first {len(test_y)} test samples)"
        if "best_worker_accuracy" in extra:
            line += f" (best single worker {extra['best_worker_accuracy']:.2%})"
        last = whole or s.step >= self.plan.recorded_steps
        if last or self.shown_step is None or s.step - self.shown_step >= self.show_every:
            self.progress.message(line)
            self.shown_step = s.step
        self.last_eval = record
        return record

    def evaluate_parameters(self, params: np.ndarray) -> float:
        """Test accuracy of other parameters in the parent's place; the parent is put back."""
        parent = self.parent
        saved, version = parent.host_params.copy(), parent.version
        np.copyto(parent.host_params, params)
        parent.host_params_changed()
        accuracy = parent.evaluate(*self.test_set())[1]
        np.copyto(parent.host_params, saved)
        parent.host_params_changed()
        parent.version = version  # exactly as it was: a state saved before still describes it
        return accuracy

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()
        if self.board is not None:
            self.board.close()

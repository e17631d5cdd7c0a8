"""What a run leaves: checkpoint.pt while it trains, then summary.json and the curves at its end."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from gen_funcs.parent import ParentModel
from gen_funcs.records import LoopState, Recorder
from libe_cnn.checkpoint import save_checkpoint
from libe_cnn.errors import CannotWrite, UserError
from libe_cnn.plan import RunPlan
from libe_cnn.rundir import save_json
from libe_cnn.store import server_traffic_bytes


class Outcome:
    """Checkpoints (regular, final, and after a failure) and the run's summary."""

    def __init__(self, plan: RunPlan, parent: ParentModel, state: LoopState, recorder: Recorder,
                 resumed: dict | None) -> None:
        self.plan, self.cfg, self.parent, self.state, self.recorder = plan, plan.config, parent, state, recorder
        self.run_dir = Path(plan.config.run_dir)
        self.resumed = resumed
        self.first_step = resumed["step"] if resumed else 0
        self.resumed_at = [*resumed["resumed_at"], self.first_step] if resumed else []
        self.traffic_at_start = [server_traffic_bytes(a) for a in plan.servers]
        self.checkpointed_step: int | None = None
        # The state after the last step fully taken, kept for a run that fails before its next
        # checkpoint; with the parent's version it belongs to.
        self.last_completed: tuple[dict, int] | None = None

    def checkpoint_due(self, step: int) -> bool:
        return self.recorder.due(step, self.cfg.checkpoint_every)

    def checkpoint(self, workers: list[np.ndarray] | None = None, saved: dict | None = None) -> None:
        """Write checkpoint.pt: the state after a step (the current one unless `saved`), from
        which --resume continues; `workers`: each worker's own state where they keep one."""
        saved = saved or self.state.saved()
        if self.checkpointed_step == saved["step"]:
            return
        strategy = self.plan.strategy
        save_checkpoint(self.run_dir, {
            "strategy": self.cfg.strategy, **saved,
            "parent": self.parent.model.state_dict(),
            "optimizer": self.parent.optimizer.state_dict() if strategy.parent_optimizer else None,
            "workers": [torch.from_numpy(np.array(w)) for w in workers] if workers is not None else None,
            "rng": {"seed": self.cfg.seed, "torch": torch.get_rng_state()},
            "metrics_lines": self.recorder.metrics.lines, "wall_s": time.perf_counter() - self.recorder.start,
            "resumed_at": self.resumed_at,
        })
        self.checkpointed_step = saved["step"]

    def completed(self) -> None:
        """Remember the current state, after a step fully taken: what a run that fails next keeps."""
        self.last_completed = (self.state.saved(), self.parent.version)

    def checkpoint_completed(self, workers: list[np.ndarray] | None = None) -> bool:
        """Checkpoint the last step fully taken, if the parent is still as it was then (and,
        where workers keep their own state, with that state)."""
        if self.last_completed is None or self.last_completed[1] != self.parent.version:
            return False
        if self.plan.strategy.workers_keep_state and workers is None:
            return False
        self.checkpoint(workers, saved=self.last_completed[0])
        return True

    def checkpoint_on_disk(self) -> int | None:
        """The step of the run's checkpoint.pt: written here, or the one this run resumed from."""
        if self.checkpointed_step is not None:
            return self.checkpointed_step
        return self.first_step if self.resumed else None

    def finish(self, **extra) -> None:
        """Evaluate the final parent if not done yet and write summary.json.

        A run stopped early (Ctrl-C) is not evaluated again: whoever stopped it is waiting, and
        --resume evaluates where it ends. Its summary gives the last evaluation and its step.
        """
        s, recorder, cfg = self.state, self.recorder, self.cfg
        last = recorder.last_eval
        completed = s.step == self.plan.recorded_steps
        if completed and (last is None or last["step"] != s.step or last["test_samples"] < len(recorder.test_y)):
            recorder.evaluate(whole=True)
        elif not completed:
            self.parent.save(self.run_dir / "model.pt")  # the parent as it was stopped (evaluate saves it too)
        wall = time.perf_counter() - recorder.start
        per_server = [server_traffic_bytes(a) - b for a, b in zip(self.plan.servers, self.traffic_at_start)]
        store_bytes = sum(per_server)
        # Traffic is counted since this process started: per step and sample of this part.
        steps_here = max(s.step - self.first_step, 1)
        samples_here = max(s.samples - (self.resumed["samples"] if self.resumed else 0), 1)
        last_eval = recorder.last_eval
        save_json(self.run_dir / "summary.json", {
            "run_id": cfg.run_id,
            "strategy": cfg.strategy,
            "steps": s.step,
            "epochs": s.epoch + 1 if s.step else 0,
            "samples": s.samples,
            "wall_s": wall,
            "samples_per_s": s.samples / wall if wall > 0 else 0.0,
            **recorder.stats.summary(),
            "train_loss": s.loss,
            "test_loss": last_eval["test_loss"] if last_eval else None,
            "test_accuracy": last_eval["test_accuracy"] if last_eval else None,
            # What the test loss and accuracy were measured on, and at which step.
            "test_samples": last_eval["test_samples"] if last_eval else 0,
            "test_step": last_eval["step"] if last_eval else None,
            **{k: v for k, v in (last_eval or {}).items() if k.startswith("best_worker") or k == "worker_accuracies"},
            "n_workers": cfg.n_workers,
            "dataset": cfg.dataset,
            "global_batch": cfg.replicas * cfg.batch_size,
            "wire_dtype": cfg.wire_dtype,
            "store_bytes_per_step": store_bytes / steps_here,  # through all the run's servers
            "busiest_server_bytes_per_step": max(per_server) / steps_here,
            "redis_servers": len(per_server),
            "transport": "shm" if self.plan.shm_dir else "redis",  # how the buffers travelled (--transport)
            # Each worker's home server (its own host's with --redis-per-host): where its gradients and
            # parameter chunks go under sync, ring-allreduce and pipelines; the other strategies use the first.
            "worker_servers": [f"{self.plan.servers[h].host}:{self.plan.servers[h].port}" for h in self.plan.homes],
            "store_bytes_per_sample": store_bytes / samples_here,
            "resumed_at_steps": self.resumed_at,
            "data_files": self.plan.files.paths,
            "checkpoint_step": self.checkpoint_on_disk(),
            **extra,
            "completed": completed,
        })
        self.plot()

    def abandon(self, reason: str) -> None:
        """The run cannot go on: keep the parent as it is and say why in summary.json.

        Where the generator holds all the state, the last completed step is checkpointed too;
        where workers keep their own, the last regular checkpoint stays (it is not here mid-round).
        """
        # Each file on its own: when the disk is full, what still fits is written, and the reason
        # the run ended (raised by the caller) is not replaced by the next failure to write.
        for write in (lambda: self.parent.save(self.run_dir / "model.pt"), self.checkpoint_completed):
            with contextlib.suppress(CannotWrite):
                write()
        # The step the parent is at: the last one taken, or the last one recorded.
        reached = self.last_completed[0] if self.last_completed else self.recorder.last_record or {}
        with contextlib.suppress(CannotWrite):
            save_json(self.run_dir / "summary.json", {
                "run_id": self.cfg.run_id, "strategy": self.cfg.strategy, "completed": False, "error": reason,
                "steps": reached.get("step", self.first_step), "samples": reached.get("samples"),
                "checkpoint_step": self.checkpoint_on_disk(), "data_files": self.plan.files.paths,
                "transport": "shm" if self.plan.shm_dir else "redis",
                "wall_s": time.perf_counter() - self.recorder.start})
            self.plot()

    def plot(self) -> None:
        """curves.png (and the data it shows, curves.json), drawn from metrics.jsonl."""
        from libe_cnn.plots import write_curves  # matplotlib: only once, at the end

        try:
            write_curves([self.run_dir], self.run_dir / "curves.png")
        except UserError:
            pass  # no step was taken: nothing to draw

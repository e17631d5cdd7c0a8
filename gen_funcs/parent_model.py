"""The parent-model generator: a persistent libEnsemble generator on the manager.

It holds the parent model and runs one of the aggregation strategies (--strategy):

    sync     each step, one gradient per worker -> reduce -> one optimizer step -> new
             parameters, put once, to all N
    async    each gradient is applied as it arrives; only its sender gets fresh parameters
    param-avg, weighted-param-avg, easgd, gossip, local
             workers take K local steps; the generator then averages, mixes, moves the
             center, draws gossip pairs, or only evaluates

The math is in gen_funcs/aggregation.py; this module does the messaging and bookkeeping.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
import torch
from libensemble.comms.comms import Timeout as CommTimeout
from libensemble.message_numbers import EVAL_GEN_TAG, FINISHED_PERSISTENT_GEN_TAG, PERSIS_STOP, STOP_TAG
from libensemble.tools.persistent_support import PersistentSupport

from gen_funcs.aggregation import (
    average_parameters,
    elastic_center_update,
    gossip_pairing,
    mix_parameters,
    reduce_gradients,
    staleness_weight,
)
from gen_funcs.stats import RunStats
from libe_cnn.checkpoint import load_checkpoint, save_checkpoint
from libe_cnn.config import TrainConfig
from libe_cnn.errors import UserError
from libe_cnn.flat import copy_into, flatten_gradients, flatten_parameters, host_array, push_host_array
from libe_cnn.liveness import TTL_S, LivenessCheck
from libe_cnn.plan import RunPlan, gossip_key, plan_from_user, resume_key
from libe_cnn.progress import Progress
from libe_cnn.rundir import MetricsLog, save_json, save_state_dict
from libe_cnn.runtime import available_cores, gpu_count, lower_manager_loop_priority, rss_mb, select_device, set_threads
from libe_cnn.store import TensorStore, server_traffic_bytes
from libe_cnn.wire import from_wire, to_wire
from mnist.data import load_split
from mnist.model import build_model, evaluate, make_optimizer


# How long the generator waits for rows before it checks that every worker is alive.
LIVENESS_CHECK_S = 2.0


class RunAborted(RuntimeError):
    """The run cannot go on; the parent is kept as it was before the cause."""


class WorkerLost(RunAborted):
    """A simulator stopped sending heartbeats: it died, hangs, or lost its node."""


class NonFinite(RunAborted):
    """A worker sent NaN or inf (--on-nonfinite stop)."""


def finite(buffer: np.ndarray) -> bool:
    # NaN propagates through min and max, and inf shows in one of them: two passes, no copy.
    return bool(np.isfinite(buffer.min()) and np.isfinite(buffer.max()))


class ParentModel:
    """The parent model, its optimizer, and host buffers for gradients and parameters."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.model = build_model(cfg.seed, cfg.dropout, cfg.dataset).to(device)
        self.flat_params = flatten_parameters(self.model)
        self.flat_grad = flatten_gradients(self.model)
        on_cpu = device.type == "cpu"
        # On the CPU the math writes straight into the model's own buffers; on a GPU it
        # works on host copies, pushed to the device afterwards.
        self.host_grad = self.flat_grad.numpy() if on_cpu else np.empty(self.flat_grad.numel(), np.float32)
        self.host_params = host_array(self.flat_params)
        self.optimizer = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr)
        self.version = 0  # changes of the parameters so far: tells whether a saved state is current

    def params_for_wire(self) -> np.ndarray:
        return to_wire(self.flat_params, self.cfg.wire_dtype)

    def apply(self, grads: list[np.ndarray], mode: str) -> None:
        """Reduce float32 gradients (in the given order) and take one optimizer step."""
        reduce_gradients(grads, self.host_grad, mode)
        if self.device.type != "cpu":
            copy_into(self.flat_grad, self.host_grad)
        self.optimizer.step()
        self.version += 1

    def host_params_changed(self) -> None:
        """Push host_params, just changed by the aggregation math, into the model."""
        push_host_array(self.flat_params, self.host_params)
        self.version += 1

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        return evaluate(self.model, images, labels)

    def save(self, path: Path) -> None:
        save_state_dict(path, self.model)

    def restore(self, checkpoint: dict) -> None:
        # The parameters are views of flat_params: loading copies into them in place.
        self.model.load_state_dict(checkpoint["parent"])
        if checkpoint["optimizer"] is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])


@dataclass
class Gathered:
    """One row per simulator, in shard order, with what was fetched for them."""

    rows: np.ndarray
    results: list[np.ndarray] | None  # float32 buffers, when fetched
    wait_s: float  # blocked waiting for rows
    fetch_s: float  # fetching their buffers


class GenRun:
    """What every strategy shares: the parent, the store, messages, metrics and evaluation."""

    def __init__(self, plan: RunPlan, gen_specs: dict, libE_info: dict) -> None:
        cfg = plan.config
        self.plan, self.cfg, self.n = plan, cfg, cfg.n_workers
        self.run_dir = Path(cfg.run_dir)
        self.gen_out = gen_specs["out"]
        # The manager computes only while the simulators wait for it, so it may use all cores.
        set_threads(available_cores())
        lower_manager_loop_priority()
        self.parent = ParentModel(cfg, torch.device(select_device(cfg.gen_device, 0, gpu_count())))
        self.test_x, self.test_y = load_split(plan.files, train=False)
        self.store = TensorStore(plan.redis, cfg.run_id)
        self.ps = PersistentSupport(libE_info, EVAL_GEN_TAG)
        self.liveness = LivenessCheck(plan.redis, cfg.run_id, self.n)
        # Resuming: the parent, the metrics and the clock continue from the checkpoint.
        self.resumed = load_checkpoint(self.run_dir) if cfg.resume else None
        if self.resumed is not None:
            self.parent.restore(self.resumed)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl",
                                  keep=self.resumed["metrics_lines"] if self.resumed else None)
        self.stats = RunStats()
        self.traffic_at_start = server_traffic_bytes(plan.redis)
        self.start = time.perf_counter() - (self.resumed["wall_s"] if self.resumed else 0.0)
        self.first_step = self.resumed["step"] if self.resumed else 0
        self.resumed_at = [*self.resumed["resumed_at"], self.first_step] if self.resumed else []
        self.checkpointed_step: int | None = None
        # The checkpoint of the last step fully taken (sync, async), kept for a run that fails
        # before its next regular checkpoint; with the parent's version it belongs to.
        self.last_completed: tuple[dict, int] | None = None
        self.last_eval: dict | None = None
        self.last_record: dict | None = None
        self.total_steps = plan.recorded_steps
        self.progress = Progress(self.total_steps, unit=plan.step_unit)

    # --- messages ---

    def send(self, count: int, step: int, n_steps: int = 1, params_key: str = "", peers_key: str = "",
             checkpoint: bool = False) -> None:
        """`count` identical rows; libEnsemble hands each to a simulator that is waiting."""
        rows = np.zeros(count, dtype=self.gen_out)
        rows["params_key"], rows["peers_key"] = params_key, peers_key
        rows["step"], rows["n_steps"], rows["checkpoint"] = step, n_steps, checkpoint
        self.ps.send(rows)

    def receive(self) -> np.ndarray | None:
        """The next simulator rows (one or more), or None when the manager stops the run.

        Raises WorkerLost if a simulator goes silent meanwhile, rather than wait forever.
        """
        while not self._mail_within(LIVENESS_CHECK_S):
            lost = self.liveness.lost()
            if lost:
                raise WorkerLost(", ".join(f"worker {s + 1}" for s in lost)
                                 + f" stopped responding (no heartbeat for {TTL_S} s): it died, hangs, or lost its node")
        tag, _, calc_in = self.ps.recv()
        return None if tag in (STOP_TAG, PERSIS_STOP) else calc_in

    def _mail_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for a message from the manager, leaving it to be received."""
        comm = self.ps.comm
        if not hasattr(comm, "push_to_buffer"):
            return True  # a comm without timeouts: block in recv as before
        try:
            message = comm.recv(timeout=seconds)
        except CommTimeout:
            return False
        comm.push_to_buffer(*message)
        return True

    def screen(self, results: list[np.ndarray], rows: np.ndarray, step: int, what: str) -> list[int]:
        """Indices of non-finite results; with --on-nonfinite stop, the first one ends the run."""
        bad = [i for i, r in enumerate(results) if not finite(r)]
        if bad and self.cfg.on_nonfinite == "stop":
            workers = ", ".join(f"worker {int(rows[i]['shard']) + 1}" for i in bad)
            raise NonFinite(f"non-finite {what} (NaN or inf) from {workers} at step {step}; the parent is kept "
                            "from before it (lower --lr, or --on-nonfinite skip)")
        return bad

    def fetch(self, keys: list[str]) -> list[np.ndarray]:
        return [from_wire(a, self.cfg.wire_dtype) for a in self.store.get_many(keys)]

    def gather(self, fetch: bool, evict: bool) -> Gathered | None:
        """One row from every simulator; with `fetch`, each result as soon as its row arrives.

        Fetching while slower workers still compute takes most of the transfer off the
        step's critical path. Rows and results come back in shard order, so the math runs
        in the same order in every run.
        """
        rows: dict[int, np.void] = {}
        results: dict[int, np.ndarray] = {}
        wait_s = fetch_s = 0.0
        while len(rows) < self.n:
            t0 = time.perf_counter()
            calc_in = self.receive()
            if calc_in is None:
                return None
            t1 = time.perf_counter()
            for row in calc_in:
                shard = int(row["shard"])
                if shard in rows or not 0 <= shard < self.n:
                    raise RuntimeError(f"unexpected result from shard {shard}")
                rows[shard] = row
            keys = [str(k) for k in calc_in["result_key"]]
            if fetch:
                for row, result in zip(calc_in, self.fetch(keys)):
                    results[int(row["shard"])] = result
            if evict:
                self.store.evict(keys)
            wait_s += t1 - t0
            fetch_s += time.perf_counter() - t1
        ordered = np.array([rows[s] for s in range(self.n)], dtype=calc_in.dtype)
        return Gathered(ordered, [results[s] for s in range(self.n)] if fetch else None, wait_s, fetch_s)

    # --- bookkeeping ---

    def _due(self, step: int, every: int | None) -> bool:
        """At every epoch end, every `every` steps and at the last step."""
        return (step % self.plan.steps_per_epoch == 0 or step == self.plan.total_steps
                or bool(every and step % every == 0))

    def eval_due(self, step: int) -> bool:
        return self._due(step, self.cfg.eval_every)

    def checkpoint_due(self, step: int) -> bool:
        return self._due(step, self.cfg.checkpoint_every)

    def restored(self, **fresh):
        """The loop's running values named in `fresh`: from the checkpoint when resuming."""
        saved = {**self.resumed, **self.resumed["counters"]} if self.resumed else {}
        return tuple(saved.get(name, value) for name, value in fresh.items())

    def checkpoint(self, step: int, epoch: int, samples: int, loss: float, positions: list[int],
                   counters: dict | None = None, workers: list[np.ndarray] | None = None) -> None:
        """Write checkpoint.pt: the state after `step`, from which --resume continues."""
        if self.checkpointed_step == step:
            return
        save_checkpoint(self.run_dir, {
            "strategy": self.cfg.strategy, "step": step, "epoch": epoch, "samples": samples, "loss": loss,
            "positions": list(positions), "counters": counters or {},
            "parent": self.parent.model.state_dict(),
            "optimizer": self.parent.optimizer.state_dict() if self.cfg.strategy in LOOPS else None,
            "workers": [torch.from_numpy(np.array(w)) for w in workers] if workers is not None else None,
            "rng": {"seed": self.cfg.seed, "torch": torch.get_rng_state()},
            "metrics_lines": self.metrics.lines, "wall_s": time.perf_counter() - self.start,
            "resumed_at": self.resumed_at,
        })
        self.checkpointed_step = step

    def completed(self, step: int, epoch: int, samples: int, loss: float, positions: list[int],
                  counters: dict) -> None:
        """Remember the state after a step fully taken: what a run that fails next keeps."""
        state = {"step": step, "epoch": epoch, "samples": samples, "loss": loss, "positions": list(positions),
                 "counters": counters}
        self.last_completed = (state, self.parent.version)

    def checkpoint_completed(self) -> bool:
        """Checkpoint the last step fully taken, if the parent is still as it was then."""
        if self.last_completed is None or self.last_completed[1] != self.parent.version:
            return False
        self.checkpoint(**self.last_completed[0])
        return True

    def record(self, rows: np.ndarray, **record) -> dict:
        """Write one metrics record, with the simulators' timings from `rows`, and show progress."""
        record.update({f"sim_{name}": float(rows[name].mean()) for name in ("load_s", "compute_s", "put_s", "wait_s")})
        record.update(manager_rss_mb=rss_mb(), sim_rss_mb=float(rows["rss_mb"].max()))
        self.metrics.write(**record)
        self.last_record = record
        self.stats.step(record)
        self.progress.update(record["step"], record["epoch"], record["loss"],
                        self.last_eval["test_accuracy"] if self.last_eval else None,
                        record["samples"] / record["wall_s"])
        return record

    def evaluate(self, step: int, epoch: int, samples: int, **extra) -> dict:
        """Test the parent model, save it, and log the result."""
        t0 = time.perf_counter()
        test_loss, test_acc = self.parent.evaluate(self.test_x, self.test_y)
        self.parent.save(self.run_dir / "model.pt")
        eval_s = time.perf_counter() - t0
        record = {"event": "eval", "step": step, "epoch": epoch, "samples": samples, "test_loss": test_loss,
                  "test_accuracy": test_acc, **extra, "eval_s": eval_s, "wall_s": time.perf_counter() - self.start}
        self.metrics.write(**record)
        line = f"epoch {epoch + 1} {self.plan.step_unit} {step}: test loss {test_loss:.4f}, test accuracy {test_acc:.2%}"
        if "best_worker_accuracy" in extra:
            line += f" (best single worker {extra['best_worker_accuracy']:.2%})"
        self.progress.message(line)
        self.last_eval = record
        return record

    def finish(self, step: int, epoch: int, samples: int, loss: float, **extra) -> None:
        """Evaluate the final parent if not done yet and write summary.json."""
        if self.last_eval is None or self.last_eval["step"] != step:
            self.evaluate(step, epoch, samples)
        wall = time.perf_counter() - self.start
        store_bytes = server_traffic_bytes(self.plan.redis) - self.traffic_at_start
        # Traffic is counted since this process started: per step and sample of this part.
        steps_here = max(step - self.first_step, 1)
        samples_here = max(samples - (self.resumed["samples"] if self.resumed else 0), 1)
        cfg = self.cfg
        save_json(self.run_dir / "summary.json", {
            "run_id": cfg.run_id,
            "strategy": cfg.strategy,
            "steps": step,
            "epochs": epoch + 1 if step else 0,
            "samples": samples,
            "wall_s": wall,
            "samples_per_s": samples / wall if wall > 0 else 0.0,
            **self.stats.summary(),
            "train_loss": loss,
            "test_loss": self.last_eval["test_loss"],
            "test_accuracy": self.last_eval["test_accuracy"],
            **{k: v for k, v in self.last_eval.items() if k.startswith("best_worker") or k == "worker_accuracies"},
            "n_workers": self.n,
            "dataset": cfg.dataset,
            "global_batch": self.n * cfg.batch_size,
            "wire_dtype": cfg.wire_dtype,
            "store_bytes_per_step": store_bytes / steps_here,
            "store_bytes_per_sample": store_bytes / samples_here,
            "resumed_at_steps": self.resumed_at,
            "data_files": self.plan.files.paths,
            **extra,
            "completed": step == self.total_steps,
        })
        self.plot()

    def abandon(self, reason: str) -> None:
        """The run cannot go on: keep the parent as it is and say why in summary.json.

        sync and async also checkpoint their last completed step (the periodic strategies
        keep their last regular checkpoint: mid-round their workers' state is not here).
        """
        self.parent.save(self.run_dir / "model.pt")
        self.checkpoint_completed()
        # The step the parent is at: the last one taken (sync, async) or recorded (the others).
        reached = self.last_completed[0] if self.last_completed else self.last_record or {}
        save_json(self.run_dir / "summary.json", {
            "run_id": self.cfg.run_id, "strategy": self.cfg.strategy, "completed": False, "error": reason,
            "steps": reached.get("step", self.first_step), "samples": reached.get("samples"),
            "checkpoint_step": self.checkpoint_on_disk(),
            "data_files": self.plan.files.paths, "wall_s": time.perf_counter() - self.start})
        self.plot()

    def checkpoint_on_disk(self) -> int | None:
        """The step of the run's checkpoint.pt: written here, or the one this run resumed from."""
        if self.checkpointed_step is not None:
            return self.checkpointed_step
        return self.first_step if self.resumed else None

    def plot(self) -> None:
        """curves.png (and the data it shows, curves.json), drawn from metrics.jsonl."""
        from libe_cnn.plots import write_curves  # matplotlib: only once, at the end

        try:
            write_curves([self.run_dir], self.run_dir / "curves.png")
        except UserError:
            pass  # no step was taken: nothing to draw

    def close(self) -> None:
        self.metrics.close()
        self.store.close()
        self.liveness.close()


def run_sync(run: GenRun) -> None:
    """Parallel SGD: every step reduces one gradient per worker into one optimizer step."""
    plan, n, parent = run.plan, run.n, run.parent
    step, epoch, samples, loss, skipped = run.restored(step=0, epoch=0, samples=0, loss=float("nan"), skipped=0)
    params_key = run.store.put(parent.params_for_wire())
    run.send(n, step, params_key=params_key)
    while step < plan.total_steps:
        got = run.gather(fetch=True, evict=True)
        if got is None:
            break  # the manager ends the run early (an exit criterion or an error)
        # Every simulator has loaded these parameters: the store holds at most one step.
        run.store.evict([params_key])
        t2 = time.perf_counter()
        bad = run.screen(got.results, got.rows, step + 1, "gradient")
        good = [g for i, g in enumerate(got.results) if i not in bad]
        if good:  # with every gradient skipped, the parent stays as it is
            parent.apply(good, run.cfg.reduce)
        skipped += len(bad)
        t3 = time.perf_counter()
        step += 1
        epoch = (step - 1) // plan.steps_per_epoch
        samples += int(got.rows["n_samples"].sum())
        loss = float(got.rows["loss"].mean())
        # The step is taken: a failure from here on keeps it (the publish goes to the store).
        run.completed(step, epoch, samples, loss, [step] * n, {"skipped": skipped})
        if step < plan.total_steps:
            # Publish before any bookkeeping: the simulators are waiting for it.
            params_key = run.store.put(parent.params_for_wire())
            run.send(n, step, params_key=params_key)
        t4 = time.perf_counter()
        run.record(got.rows, step=step, epoch=epoch, loss=loss, samples=samples, wall_s=t4 - run.start,
                   nonfinite=len(bad), gen_wait_s=got.wait_s, fetch_s=got.fetch_s, update_s=t3 - t2,
                   publish_s=t4 - t3)
        if run.eval_due(step):
            run.evaluate(step, epoch, samples)
        if run.checkpoint_due(step):
            run.checkpoint_completed()
    # Also when the run was stopped early: every worker redoes the step it was on.
    run.checkpoint(step, epoch, samples, loss, [step] * n, {"skipped": skipped})
    run.finish(step, epoch, samples, loss, nonfinite_skipped=skipped)


def run_async(run: GenRun) -> None:
    """An asynchronous parameter server: each gradient is applied the moment it arrives.

    Steps here count single gradients: the same samples as sync take N times the steps. A
    gradient computed on parameters more than --max-staleness updates old is dropped.
    """
    plan, n, parent, cfg = run.plan, run.n, run.parent, run.cfg
    total = run.total_steps
    # version: optimizer steps taken by the parent; positions: batches each worker has done.
    step, epoch, samples, loss, version, positions, dropped, skipped, staleness_sum, staleness_max = run.restored(
        step=0, epoch=0, samples=0, loss=float("nan"), version=0, positions=[0] * n, dropped=0, skipped=0,
        staleness_sum=0, staleness_max=0)
    positions = list(positions)
    # Parameter versions sent and not yet loaded by every worker they went to: [key, workers].
    outstanding: dict[int, list] = {version: [run.store.put(parent.params_for_wire()), n]}
    run.send(n, version, params_key=outstanding[version][0])
    in_flight = n  # rows sent and not yet answered

    def async_counters() -> dict:
        return {"version": version, "dropped": dropped, "skipped": skipped,
                "staleness_sum": staleness_sum, "staleness_max": staleness_max}

    def loaded(v: int) -> None:
        """A worker has answered from version v, so it has loaded it."""
        outstanding[v][1] -= 1
        if outstanding[v][1] == 0:
            run.store.evict([outstanding.pop(v)[0]])

    def stops_at(gradients: int) -> bool:
        """Whether this many gradients complete a sync-sized step due an evaluation or checkpoint."""
        return gradients % n == 0 and (run.eval_due(gradients // n) or run.checkpoint_due(gradients // n))

    pending = None  # rows received and not yet handled
    while step < total:
        t0 = time.perf_counter()
        if pending is None or len(pending) == 0:
            received = run.receive()
            if received is None:
                break
            in_flight -= len(received)
            run.store.evict([str(k) for k in received["result_key"][total - step:]])  # beyond the budget
            pending = received[: total - step]
        # Handle rows only up to the next evaluation or checkpoint, so that both see the parent
        # exactly at that step, whatever number of results arrived together.
        cut = next((k for k in range(1, len(pending)) if stops_at(step + k)), len(pending))
        rows, pending = pending[:cut], pending[cut:]
        t1 = time.perf_counter()
        keys = [str(k) for k in rows["result_key"]]
        grads = run.fetch(keys)
        run.store.evict(keys)
        t2 = time.perf_counter()
        outcomes = []  # (staleness, used, non-finite) per row
        bad = run.screen(grads, rows, step + 1, "gradient")
        for i, (row, grad) in enumerate(zip(rows, grads)):
            staleness = version - int(row["version"])
            used = staleness_weight(staleness, cfg.max_staleness) > 0 and i not in bad
            if used:
                parent.apply([grad], "sum")
                version += 1
            elif i in bad:
                skipped += 1
            else:
                dropped += 1
            loaded(int(row["version"]))
            positions[int(row["shard"])] += 1
            staleness_sum += staleness
            staleness_max = max(staleness_max, staleness)
            outcomes.append((staleness, used, i in bad))
        t3 = time.perf_counter()
        # These gradients are taken: a failure from here on keeps them.
        taken = step + len(rows)
        run.completed(taken, (taken - 1) // (n * plan.steps_per_epoch), samples + int(rows["n_samples"].sum()),
                      float(rows[-1]["loss"]), positions, async_counters())
        if step + len(rows) < total:
            # Only the workers that just answered are waiting; each gets the newest parameters
            # (already in the store if every gradient of this batch was dropped).
            if version not in outstanding:
                outstanding[version] = [run.store.put(parent.params_for_wire()), 0]
            outstanding[version][1] += len(rows)
            run.send(len(rows), version, params_key=outstanding[version][0])
            in_flight += len(rows)
        t4 = time.perf_counter()
        share = 1.0 / len(rows)  # the generator's time is split evenly over the rows it handled
        for i, (staleness, used, nonfinite) in enumerate(outcomes):
            step += 1
            samples += int(rows[i]["n_samples"])
            epoch = (step - 1) // (n * plan.steps_per_epoch)
            loss = float(rows[i]["loss"])
            run.record(rows[i : i + 1], step=step, epoch=epoch, loss=loss, samples=samples, wall_s=t4 - run.start,
                       staleness=staleness, dropped=not used and not nonfinite, nonfinite=nonfinite,
                       version=version, gen_wait_s=(t1 - t0) * share, fetch_s=(t2 - t1) * share,
                       update_s=(t3 - t2) * share, publish_s=(t4 - t3) * share)
        # Evaluate and checkpoint where sync would: after every N gradients that complete such a step.
        if step % n == 0 and run.eval_due(step // n):
            run.evaluate(step, epoch, samples)
        if step % n == 0 and run.checkpoint_due(step // n):
            run.checkpoint_completed()
    # Wait for the gradients still being computed, as sync does: libEnsemble may start the
    # generator again if it ends while simulators are busy. They are not applied.
    while step == total and in_flight > 0:
        rows = run.receive()
        if rows is None:
            break
        run.store.evict([str(k) for k in rows["result_key"]])
        in_flight -= len(rows)
    # Gradients in flight when the run was stopped are computed again after a resume.
    run.checkpoint(step, epoch, samples, loss, positions, async_counters())
    run.finish(step, epoch, samples, loss, updates=version, dropped=dropped, nonfinite_skipped=skipped,
               mean_staleness=staleness_sum / max(step, 1), max_staleness_seen=staleness_max)


def run_periodic(run: GenRun) -> None:
    """Workers take local steps; every round the generator combines their parameters.

    param-avg           parent <- mean(workers), sent to all
    weighted-param-avg  parent <- (1 - lambda) parent + lambda mean(workers), sent to all
    easgd               center <- center + alpha sum(workers - center); the old center was
                        sent at the round's start and each worker pulls toward it itself
    gossip              pairs of workers average with each other through the store; the
                        parent is the workers' mean, computed only to evaluate it
    local               no exchange; the parent is the workers' mean; at the end the best
                        single worker is evaluated too
    Rounds last --sync-period steps (local: until the next evaluation), cut short at every
    evaluation point, so that all strategies are evaluated at the same steps, and at every
    checkpoint, where the workers send their own state too.
    """
    plan, n, parent, cfg = run.plan, run.n, run.parent, run.cfg
    strategy = cfg.strategy
    step, epoch, samples, loss, exchanges = run.restored(step=0, epoch=0, samples=0, loss=float("nan"), exchanges=0)

    def round_length(start: int) -> int:
        end = start + 1
        limit = plan.total_steps if strategy == "local" else min(start + cfg.sync_period, plan.total_steps)
        while end < limit and not (run.eval_due(end) or run.checkpoint_due(end)):
            end += 1
        return end - start

    def start_round(start: int) -> tuple[int, list[str]]:
        """Send every worker its next round; returns the round's length and the keys put for it."""
        nonlocal exchanges
        n_steps = round_length(start)
        round_rows = {"step": start, "n_steps": n_steps, "checkpoint": run.checkpoint_due(start + n_steps)}
        key = None
        if start > 0 and strategy == "gossip":
            key = run.store.put(gossip_pairing(n, exchanges, cfg.seed, cfg.gossip_topology))
            run.send(n, peers_key=key, **round_rows)
        elif start > 0 and strategy == "local":
            run.send(n, **round_rows)
        else:  # at the start everyone gets the parent; param-avg and the like, every round
            key = run.store.put(parent.params_for_wire())
            run.send(n, params_key=key, **round_rows)
        exchanges += start > 0 and strategy != "local"
        return n_steps, [key] if key else []

    sent = put_worker_states(run, step) if run.resumed else []
    n_steps, keys = start_round(step)
    sent += keys
    while step < plan.total_steps:
        end = step + n_steps
        evaluate_now = run.eval_due(end)
        needs_models = strategy in ("param-avg", "weighted-param-avg", "easgd") or evaluate_now
        # Gossip partners read each other's parameters next round: keep them until then.
        got = run.gather(fetch=needs_models, evict=strategy != "gossip")
        if got is None:
            break
        # Every worker has now used what it was sent last round.
        run.store.evict(sent)
        sent = [str(k) for k in got.rows["result_key"]] if strategy == "gossip" else []
        t2 = time.perf_counter()
        if got.results is not None:
            run.screen(got.results, got.rows, end, "parameters")
        host = parent.host_params
        if strategy == "param-avg":
            average_parameters(got.results, host)
        elif strategy == "weighted-param-avg":
            mix_parameters(host, average_parameters(got.results, np.empty_like(host)), cfg.mix_lambda)
        elif strategy == "easgd":
            elastic_center_update(host, got.results, cfg.easgd_alpha)
        elif evaluate_now:  # gossip, local: the model to evaluate is the workers' mean
            average_parameters(got.results, host)
        parent.host_params_changed()
        t3 = time.perf_counter()
        step = end
        counters = {"exchanges": exchanges}  # what the next round starts from, for a checkpoint
        if step < plan.total_steps:
            n_steps, keys = start_round(step)
            sent += keys
        t4 = time.perf_counter()
        epoch = (step - 1) // plan.steps_per_epoch
        samples += int(got.rows["n_samples"].sum())
        loss = float(got.rows["loss"].mean())
        run.record(got.rows, step=step, epoch=epoch, loss=loss, samples=samples, wall_s=t4 - run.start,
                   gen_wait_s=got.wait_s, fetch_s=got.fetch_s, update_s=t3 - t2, publish_s=t4 - t3)
        if evaluate_now:
            extra = {}
            if strategy == "local" and step == plan.total_steps:
                # Each worker's own model too, once: N more evaluations.
                extra = worker_accuracies(run, got.results)
            run.evaluate(step, epoch, samples, **extra)
        if run.checkpoint_due(step):  # the workers sent their state with this round's rows
            state_keys = [str(k) for k in got.rows["state_key"]]
            states = run.store.get_many(state_keys)
            run.store.evict(state_keys)
            run.checkpoint(step, epoch, samples, loss, [step] * n, counters, workers=states)
    # A run stopped mid-round keeps its last checkpoint: the workers' states are not here.
    run.store.evict(sent)
    run.finish(step, epoch, samples, loss, exchanges=exchanges)


def put_worker_states(run: GenRun, step: int) -> list[str]:
    """Resuming: each worker's own state, and (gossip) the parameters its first peer reads."""
    keys = []
    n_params = run.parent.flat_params.numel()
    for shard, state in enumerate(run.resumed["workers"]):
        keys.append(run.store.put(state.numpy(), resume_key(shard)))
        if run.cfg.strategy == "gossip":
            keys.append(run.store.put(to_wire(state[:n_params], run.cfg.wire_dtype), gossip_key(step, shard)))
    return keys


def worker_accuracies(run: GenRun, models: list[np.ndarray]) -> dict:
    """Test accuracy of each worker's own model (the parent is restored afterwards)."""
    parent = run.parent
    saved = parent.host_params.copy()
    accuracies = []
    for model in models:
        np.copyto(parent.host_params, model)
        parent.host_params_changed()
        accuracies.append(parent.evaluate(run.test_x, run.test_y)[1])
    np.copyto(parent.host_params, saved)
    parent.host_params_changed()
    best = int(np.argmax(accuracies))
    return {"best_worker_accuracy": accuracies[best], "best_worker": best, "worker_accuracies": accuracies}


def failure_reason(error: Exception) -> str:
    """One line for summary.json on why the run could not go on."""
    if isinstance(error, RunAborted):
        return str(error)
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return f"lost the connection to Redis: {error}"
    return f"{type(error).__name__}: {error}"


LOOPS = {"sync": run_sync, "async": run_async}


def parent_model_gen(H, persis_info, gen_specs, libE_info):
    plan = plan_from_user(gen_specs["user"])
    summary = Path(plan.config.run_dir) / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("run_id") == plan.config.run_id:
        # libEnsemble restarts a generator that ended while simulators were still busy;
        # fail loudly rather than start the run over on top of its own results.
        raise RuntimeError("the generator was started a second time after the run had finished")
    run = GenRun(plan, gen_specs, libE_info)
    try:
        LOOPS.get(plan.config.strategy, run_periodic)(run)
    except Exception as e:  # whatever ended it, what the run had is kept and the reason written down
        run.abandon(failure_reason(e))
        raise
    finally:
        run.close()
    return None, persis_info, FINISHED_PERSISTENT_GEN_TAG

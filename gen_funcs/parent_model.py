"""The parent-model generator: a persistent libEnsemble generator on the manager.

Each step it receives one row per simulator (the store key of that worker's flat gradient),
reduces the gradients, takes the optimizer step on the parent model and sends the key of
the new parameters, put once, to every simulator.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from libensemble.message_numbers import EVAL_GEN_TAG, FINISHED_PERSISTENT_GEN_TAG, PERSIS_STOP, STOP_TAG
from libensemble.tools.persistent_support import PersistentSupport

from gen_funcs.reduce import reduce_gradients
from gen_funcs.stats import RunStats
from libe_cnn.config import TrainConfig
from libe_cnn.flat import copy_into, flatten_gradients, flatten_parameters
from libe_cnn.plan import plan_from_user
from libe_cnn.progress import Progress
from libe_cnn.rundir import MetricsLog, save_json, save_state_dict
from libe_cnn.runtime import available_cores, gpu_count, lower_manager_loop_priority, rss_mb, select_device, set_threads
from libe_cnn.store import TensorStore, server_traffic_bytes
from libe_cnn.wire import from_wire, to_wire
from mnist.data import load_split
from mnist.model import build_model, evaluate


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    # Fused kernels update all parameters in one pass: Adam's step took 0.6 ms instead of
    # 1.7 ms here, time every simulator spends waiting.
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True)
    raise ValueError(f"unknown optimizer {name!r}")


class ParentModel:
    """The parent model, its optimizer, and the buffer the workers' gradients reduce into."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.model = build_model(cfg.seed, cfg.dropout).to(device)
        self.flat_params = flatten_parameters(self.model)
        self.flat_grad = flatten_gradients(self.model)
        # On CPU the reduction writes straight into the .grad views; on a GPU it stages on the host.
        self.host_grad = self.flat_grad.numpy() if device.type == "cpu" else np.empty(self.flat_grad.numel(), np.float32)
        self.optimizer = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr)

    def params_for_wire(self) -> np.ndarray:
        return to_wire(self.flat_params, self.cfg.wire_dtype)

    def apply(self, wire_grads: list[np.ndarray]) -> None:
        """Reduce the workers' gradients (in the given order) and take one optimizer step."""
        grads = [from_wire(g, self.cfg.wire_dtype) for g in wire_grads]
        reduce_gradients(grads, self.host_grad, self.cfg.reduce)
        if self.device.type != "cpu":
            copy_into(self.flat_grad, self.host_grad)
        self.optimizer.step()

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        return evaluate(self.model, images, labels)

    def save(self, path: Path) -> None:
        save_state_dict(path, self.model)


def _rows(gen_specs: dict, n: int, params_key: str, step: int) -> np.ndarray:
    rows = np.zeros(n, dtype=gen_specs["out"])
    rows["params_key"] = params_key
    rows["step"] = step
    return rows


def _gather_step(ps: PersistentSupport, store: TensorStore, n: int, step: int):
    """Receive one row per simulator, fetching each gradient as soon as its row arrives.

    Fetching while slower workers still compute takes most of the transfer off the step's
    critical path. Returns (rows, gradients) in shard order, so that the reduction order and
    hence the result are the same in every run, plus the seconds spent waiting and fetching;
    None if the manager stops the run.
    """
    rows: dict[int, np.void] = {}
    grads: dict[int, np.ndarray] = {}
    wait_s = fetch_s = 0.0
    while len(rows) < n:
        t0 = time.perf_counter()
        tag, _, calc_in = ps.recv()
        if tag in (STOP_TAG, PERSIS_STOP):
            return None
        t1 = time.perf_counter()
        keys = [str(k) for k in calc_in["grad_key"]]
        for row, grad in zip(calc_in, store.get_many(keys)):
            shard = int(row["shard"])
            if shard in rows or not 0 <= shard < n:
                raise RuntimeError(f"step {step}: unexpected gradient from shard {shard}")
            rows[shard], grads[shard] = row, grad
        store.evict(keys)
        wait_s += t1 - t0
        fetch_s += time.perf_counter() - t1
    ordered = np.array([rows[s] for s in range(n)], dtype=calc_in.dtype)
    return ordered, [grads[s] for s in range(n)], wait_s, fetch_s


def parent_model_gen(H, persis_info, gen_specs, libE_info):
    plan = plan_from_user(gen_specs["user"])
    cfg = plan.config
    n = cfg.n_workers
    run_dir = Path(cfg.run_dir)

    # The manager computes only while every simulator waits for it, so it may use all cores.
    set_threads(available_cores())
    lower_manager_loop_priority()
    parent = ParentModel(cfg, torch.device(select_device(cfg.device, 0, gpu_count())))
    test_x, test_y = load_split(plan.files, train=False)
    store = TensorStore(plan.redis, cfg.run_id)
    ps = PersistentSupport(libE_info, EVAL_GEN_TAG)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    progress = Progress(plan.total_steps)
    stats = RunStats()
    traffic_at_start = server_traffic_bytes(plan.redis)
    start = time.perf_counter()
    samples, step, epoch, loss = 0, 0, 0, float("nan")
    last_eval: dict | None = None

    def run_eval() -> dict:
        t0 = time.perf_counter()
        test_loss, test_acc = parent.evaluate(test_x, test_y)
        parent.save(run_dir / "model.pt")
        eval_s = time.perf_counter() - t0
        stats.evaluation(eval_s)
        record = {"event": "eval", "step": step, "epoch": epoch, "test_loss": test_loss,
                  "test_accuracy": test_acc, "eval_s": eval_s, "wall_s": time.perf_counter() - start}
        metrics.write(**record)
        progress.message(f"epoch {epoch + 1} step {step}: test loss {test_loss:.4f}, test accuracy {test_acc:.2%}")
        return record

    params_key = store.put(parent.params_for_wire())
    ps.send(_rows(gen_specs, n, params_key, step))
    try:
        while step < plan.total_steps:
            gathered = _gather_step(ps, store, n, step)
            if gathered is None:
                break  # the manager ends the run early (an exit criterion or an error)
            rows, grads, wait_s, fetch_s = gathered
            # Every simulator has loaded these parameters: the store holds at most one step.
            store.evict([params_key])
            t2 = time.perf_counter()
            parent.apply(grads)
            del grads
            t3 = time.perf_counter()
            step += 1
            if step < plan.total_steps:
                # Publish before any bookkeeping: the simulators are waiting for it.
                params_key = store.put(parent.params_for_wire())
                ps.send(_rows(gen_specs, n, params_key, step))
            t4 = time.perf_counter()

            epoch = (step - 1) // plan.steps_per_epoch
            samples += int(rows["n_samples"].sum())
            loss = float(rows["loss"].mean())
            record = {"step": step, "epoch": epoch, "loss": loss, "samples": samples, "wall_s": t4 - start,
                      "gen_wait_s": wait_s, "fetch_s": fetch_s, "update_s": t3 - t2, "publish_s": t4 - t3,
                      **{f"sim_{name}": float(rows[name].mean()) for name in ("load_s", "compute_s", "put_s", "wait_s")},
                      "manager_rss_mb": rss_mb(), "sim_rss_mb": float(rows["rss_mb"].max())}
            metrics.write(**record)
            stats.step(record)
            progress.update(step, epoch, loss, last_eval["test_accuracy"] if last_eval else None,
                            samples / record["wall_s"])
            if (step % plan.steps_per_epoch == 0 or step == plan.total_steps
                    or (cfg.eval_every and step % cfg.eval_every == 0)):
                last_eval = run_eval()

        if last_eval is None or last_eval["step"] != step:
            last_eval = run_eval()
        wall = time.perf_counter() - start
        save_json(run_dir / "summary.json", {
            "steps": step,
            "epochs": epoch + 1 if step else 0,
            "samples": samples,
            "wall_s": wall,
            "samples_per_s": samples / wall if wall > 0 else 0.0,
            **stats.summary(),
            "train_loss": loss,
            "test_loss": last_eval["test_loss"],
            "test_accuracy": last_eval["test_accuracy"],
            "n_workers": n,
            "dataset": cfg.dataset,
            "global_batch": n * cfg.batch_size,
            "wire_dtype": cfg.wire_dtype,
            "store_bytes_per_step": (server_traffic_bytes(plan.redis) - traffic_at_start) / max(step, 1),
            "completed": step == plan.total_steps,
        })
    finally:
        metrics.close()
        store.close()
    return None, persis_info, FINISHED_PERSISTENT_GEN_TAG

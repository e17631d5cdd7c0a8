"""The baselines the trainer is measured against: one process, and torch DDP over gloo.

Both train the same CNN on the same shards, batches and optimizer as `run_libe_cnn.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from libe_cnn.redis_server import free_port
from libe_cnn.runtime import set_threads
from mnist.data import BatchOrder, load_shard
from libe_cnn.plan import DatasetFiles
from mnist.model import build_model, evaluate, make_optimizer


@dataclass(frozen=True)
class Workload:
    """What every contender trains: the same data, model, batches and optimizer."""

    files: DatasetFiles
    n_train: int
    n_workers: int
    batch_size: int  # per worker and step
    optimizer: str = "adam"
    lr: float = 1e-3
    seed: int = 1


ROOT = Path(__file__).resolve().parent.parent


def run_trainer(*options: str) -> tuple[dict, list[dict]]:
    """Run `run_libe_cnn.py` on Fashion-MNIST with these options; its summary and metrics records."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        # Training throughput: no evaluations besides the epoch ends, unless the options ask.
        cmd = [sys.executable, str(ROOT / "run_libe_cnn.py"), "--dataset", "fashion-mnist", "--eval-every", "0", *options,
               "--run-dir", str(run_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"run_libe_cnn.py failed: {result.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def trainer_options(w: Workload) -> list[str]:
    """The options that make the trainer run the workload the baselines run."""
    return ["-n", str(w.n_workers), "--batch-size", str(w.batch_size), "--lr", str(w.lr),
            "--optimizer", w.optimizer, "--seed", str(w.seed)]


def _batch_order(w: Workload, shard_y, shard: int) -> BatchOrder:
    """The shard's batches in the trainer's order; as in the trainer, each epoch's order is drawn once."""
    return BatchOrder(len(shard_y), w.seed, shard, len(shard_y) // w.batch_size, w.batch_size)


def _batches(order: BatchOrder, shard_x, shard_y, step: int):
    pos = torch.from_numpy(order.positions(step))
    return shard_x[pos], shard_y[pos]


def single_process(w: Workload, threads: int, steps: int, warmup: int, union: bool) -> float:
    """Samples/s of one process: one worker's batch (union=False) or all N workers' (union=True)."""
    set_threads(threads)
    shards = [load_shard(w.files, w.n_train, w.n_workers, s, w.seed) for s in range(w.n_workers if union else 1)]
    orders = [_batch_order(w, y, s) for s, (_, y) in enumerate(shards)]
    model = build_model(w.seed).train()
    optimizer = make_optimizer(w.optimizer, model.parameters(), w.lr)
    samples, start = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            start, samples = time.perf_counter(), 0
        parts = [_batches(order, x, y, step) for order, (x, y) in zip(orders, shards)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        optimizer.zero_grad()
        F.nll_loss(model(x), y).backward()
        optimizer.step()
        samples += len(y)
    return samples / (time.perf_counter() - start)


@dataclass(frozen=True)
class DdpStop:
    """When rank 0 ends a DDP run early, decided at each evaluation: the test accuracy reached
    `target`, or the training time (evaluations excluded) passed `budget_s`."""

    target: float | None = None
    budget_s: float | None = None

    def reached(self, wall_s: float, accuracy: float) -> bool:
        return ((self.target is not None and accuracy >= self.target)
                or (self.budget_s is not None and wall_s > self.budget_s))


def _ddp_rank(rank: int, w: Workload, threads: int, steps: int, warmup: int, port: int, queue,
              eval_every: int | None, test_set, *, master_addr: str = "127.0.0.1",
              eval_steps: frozenset[int] | None = None, stop: DdpStop | None = None) -> None:
    """One DDP rank; rank 0 puts its result with `queue.put(dict)` (a queue, or anything with put).

    Evaluations (rank 0, on `test_set`) come every `eval_every` steps, or at the steps of
    `eval_steps` (counted from 1, warm-up included) when given. The master is `master_addr`:
    this machine for processes spawned here, host 0's address for ranks in other hosts
    (benchmarks/links.py). With `stop`, rank 0 may end the run at an evaluation.
    """
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port))
    set_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=w.n_workers)
    try:
        x, y = load_shard(w.files, w.n_train, w.n_workers, rank, w.seed)
        order = _batch_order(w, y, rank)
        torch.manual_seed(w.seed * 7919 + rank + 1)
        model = torch.nn.parallel.DistributedDataParallel(build_model(w.seed).train())
        optimizer = make_optimizer(w.optimizer, model.parameters(), w.lr)
        curve, samples, steps_done = [], 0, 0
        dist.barrier()
        start = time.perf_counter()
        eval_s = 0.0
        for step in range(warmup + steps):
            if step == warmup:
                dist.barrier()
                start, samples, eval_s = time.perf_counter(), 0, 0.0
            bx, by = _batches(order, x, y, step)
            optimizer.zero_grad()
            F.nll_loss(model(bx), by).backward()  # DDP all-reduces (averages) during backward
            optimizer.step()
            samples += len(by) * w.n_workers
            steps_done = step + 1
            due = (step + 1) in eval_steps if eval_steps is not None else eval_every and (step + 1) % eval_every == 0
            if due:
                t0 = time.perf_counter()
                ended = False
                if rank == 0:
                    loss, acc = evaluate(model.module, *test_set)
                    curve.append({"step": step + 1, "wall_s": t0 - start - eval_s, "test_accuracy": acc})
                    ended = stop is not None and stop.reached(t0 - start - eval_s, acc)
                if stop is None:
                    dist.barrier()
                else:  # rank 0's decision reaches every rank, and holds them as the barrier does
                    flag = torch.tensor([int(ended)])
                    dist.broadcast(flag, src=0)
                    ended = bool(flag.item())
                eval_s += time.perf_counter() - t0
                if ended:
                    break
        dist.barrier()
        elapsed = time.perf_counter() - start - eval_s
        if rank == 0:
            queue.put({"samples_per_s": samples / elapsed, "curve": curve, "steps": steps_done,
                       "warmup": warmup})
    finally:
        dist.destroy_process_group()


def ddp(w: Workload, threads: int, steps: int, warmup: int, eval_every: int | None = None,
        test_set=None) -> dict:
    """Samples/s (and, with eval_every, a test-accuracy curve) of torch DDP with N processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_rank, args=(w, threads, steps, warmup, free_port(), queue, eval_every, test_set),
                       nprocs=w.n_workers, start_method="spawn")
    return queue.get()


def write_report(data: Path, markdown, plot) -> str:
    """Write the tables (.md, from `markdown`) and the figure (.png, by `plot`) beside the
    results (.json); returns the tables."""
    result = json.loads(data.read_text())
    text = markdown(result)
    data.with_suffix(".md").write_text(text)
    plot(result, data.with_suffix(".png"))
    return text


def report_saved(data: Path, markdown, plot) -> str:
    """--report-only: redraw from the saved results, or end with one line if there are none."""
    if not data.exists():
        sys.exit(f"error: no saved results at {data}: run without --report-only first")
    return write_report(data, markdown, plot)

"""torch.distributed.pipelining as the peer baseline for pipeline (model) parallelism.

`run()` trains one of the project's networks as a pipeline of K = len(split) + 1 stages, one
process each, with torch's own `ScheduleGPipe` or `Schedule1F1B` over gloo on CPU, and
returns its throughput, per-stage busy time and bubble, losses and memory: what
`benchmarks/baselines.py` is to torch DDP for data parallelism.

The stages come from torch's tracer frontend: the network's chain of layers
(`layers()`, see mnist/model.py) is put in an `nn.Sequential`, whose children are named
"0", "1", ..., and `pipeline()` cuts it before each layer index in `split`. Every rank
traces the same model (same seed, same weights) and builds its own stage from it.

    python -m benchmarks.torch_pipeline --dataset fashion-mnist --model cnn --split 2 \
        --microbatches 4 --schedule 1f1b --batch-size 64 --steps 20

What is measured, per rank: the wall time of the steady steps (after `warmup` steps,
between two barriers), and the time in compute, by wrapping the stage's
`forward_one_chunk` and `backward_one_chunk` (the schedule calls them between its waits
for the neighbours' activations and gradients, so they hold the stage's forward and
backward and nothing of the communication) and the loss function on the last stage. The
optimizer step is timed apart. bubble = 1 - busy / step time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue as queue_module
import resource
import signal
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from libe_cnn.redis_server import free_port
from libe_cnn.runtime import set_threads
from mnist.model import build_model, make_optimizer

SCHEDULES = ("gpipe", "1f1b")
SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
DEADLINE_S = 300.0


def make_batches(dataset: str, batch_size: int, n_steps: int, seed: int, data=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches of `n_steps` steps, images [n_steps, B, C, H, W] and labels [n_steps, B].

    With `data` (images [n, C, H, W], labels [n]): the samples in an order drawn from the seed,
    a new permutation every epoch, each epoch's tail that does not fill a batch left out.
    Without: random images (standard normal) and labels drawn from the seed. Either way the
    same seed gives the same samples in the same order, and a longer run's first steps are
    a shorter one's.
    """
    g = torch.Generator().manual_seed(seed)
    if data is None:
        if dataset not in SHAPES:
            raise ValueError(f"no image shape for dataset {dataset!r}: pass data=(images, labels)")
        xs, ys = [], []
        for _ in range(n_steps):
            xs.append(torch.randn(batch_size, *SHAPES[dataset], generator=g))
            ys.append(torch.randint(0, 10, (batch_size,), generator=g))
        return torch.stack(xs), torch.stack(ys)
    images, labels = data
    n = len(labels)
    if n < batch_size:
        raise ValueError(f"{n} samples do not fill one batch of {batch_size}")
    per_epoch = n // batch_size
    positions = []
    while len(positions) < n_steps:
        perm = torch.randperm(n, generator=g)
        positions += [perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
    index = torch.stack(positions[:n_steps])
    return images[index].float().contiguous(), labels[index].long().contiguous()


def model_layers(dataset: str, model: str, seed: int, dropout: bool = True) -> torch.nn.Sequential:
    """The network as an nn.Sequential of its layers, children "0", "1", ... (same seed, same weights)."""
    return torch.nn.Sequential(*build_model(seed, dropout=dropout, dataset=dataset, model=model).layers())


def check_split(split: list[int], n_layers: int) -> None:
    if not split or list(split) != sorted(set(split)) or split[0] < 1 or split[-1] > n_layers - 1:
        raise ValueError(f"split {split} is not an increasing list of layer indices in 1..{n_layers - 1}: "
                         f"the network has {n_layers} layers")


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # The mean over a micro-batch; the schedule divides the gradients by the number of
    # micro-batches (scale_grads=True), so with equal micro-batches this is the batch mean.
    return F.nll_loss(output, target)


class _Clock:
    """Seconds spent in the wrapped calls since the last reset."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0
        return timed


def _die_with_parent() -> None:
    # If the parent is killed outright, its ranks go too (Linux only), instead of waiting in
    # gloo until its timeout.
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _rank_main(rank: int, world: int, port: int, cfg: dict, x, y, results) -> None:
    """One stage: build it from the traced model, train, report to the parent."""
    _die_with_parent()
    try:
        results.put(("ok", rank, _train_stage(rank, world, port, cfg, x, y)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put(("error", rank, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _train_stage(rank: int, world: int, port: int, cfg: dict, x, y) -> dict:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

    set_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg["deadline"]))
    torch.manual_seed(cfg["seed"] * 7919 + rank + 1)  # this stage's dropout masks
    seq = model_layers(cfg["dataset"], cfg["model"], cfg["seed"], cfg["dropout"]).train()
    micro = cfg["batch_size"] // cfg["microbatches"]
    example = torch.zeros(micro, *cfg["shape"])
    pipe = pipeline(seq, mb_args=(example,), split_spec={str(i): SplitPoint.BEGINNING for i in cfg["split"]})
    stage = pipe.build_stage(rank, torch.device("cpu"))
    module = stage.submod
    optimizer = make_optimizer("adam", module.parameters(), cfg["lr"])

    fwd, bwd, loss_clock, opt = _Clock(), _Clock(), _Clock(), _Clock()
    stage.forward_one_chunk = fwd.wrap(stage.forward_one_chunk)
    stage.backward_one_chunk = bwd.wrap(stage.backward_one_chunk)
    schedule_cls = ScheduleGPipe if cfg["schedule"] == "gpipe" else Schedule1F1B
    schedule = schedule_cls(stage, cfg["microbatches"], loss_fn=loss_clock.wrap(loss_fn))

    first, last = rank == 0, rank == world - 1
    losses, grads = [], None
    warmup, steps = cfg["warmup"], cfg["steps"]
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            for clock in (fwd, bwd, loss_clock, opt):
                clock.total = 0.0
            start = time.perf_counter()
        optimizer.zero_grad()
        mb_losses = [] if last else None
        if first:
            schedule.step(x[step])
        elif last:
            schedule.step(target=y[step], losses=mb_losses, return_outputs=False)
        else:
            schedule.step()
        if cfg["return_params"] and step == warmup + steps - 1:
            grads = {name: p.grad.detach().clone().numpy() for name, p in module.named_parameters()}
        opt.wrap(optimizer.step)()
        if last:
            losses.append(float(torch.stack([loss.detach() for loss in mb_losses]).mean()))
    dist.barrier()
    elapsed = time.perf_counter() - start
    out = {
        "elapsed_s": elapsed,
        "forward_s": fwd.total / steps,
        "backward_s": bwd.total / steps,
        "loss_s": loss_clock.total / steps,
        "optimizer_s": opt.total / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in module.parameters()),
        "losses": losses,
    }
    if cfg["return_params"]:
        out["params"] = {name: p.detach().clone().numpy() for name, p in module.named_parameters()}
        out["grads"] = grads
    return out


@contextlib.contextmanager
def _environment(**values: str):
    """os.environ with these values while the ranks are spawned (they inherit it)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def _launch(world: int, cfg: dict, x, y, deadline: float) -> list[dict]:
    """Run the K ranks; their reports in rank order. Kills them all on an error or the deadline."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    processes = []
    end = time.monotonic() + deadline
    reports: dict[int, dict] = {}
    try:
        with _environment(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"):
            for rank in range(world):
                # Only the first stage needs the images and only the last the labels.
                p = ctx.Process(target=_rank_main, daemon=True, name=f"torch-pipeline-{rank}",
                                args=(rank, world, port, cfg, x if rank == 0 else None,
                                      y if rank == world - 1 else None, results))
                p.start()
                processes.append(p)
        dead_since = None
        while len(reports) < world:
            if time.monotonic() > end:
                raise TimeoutError(f"torch pipeline: not done after {deadline:.0f} s "
                                   f"(ranks {sorted(set(range(world)) - set(reports))} still running); killed")
            try:
                status, rank, payload = results.get(timeout=0.5)
            except queue_module.Empty:
                failed = [p for p in processes if p.exitcode not in (None, 0)]
                gone = [r for r, p in enumerate(processes) if p.exitcode is not None and r not in reports]
                if failed or gone:
                    # A rank that died without a report (killed, out of memory): give the
                    # queue a moment for a report in flight, then give up.
                    dead_since = dead_since or time.monotonic()
                    if time.monotonic() - dead_since > 5:
                        codes = {r: p.exitcode for r, p in enumerate(processes)}
                        raise RuntimeError(f"torch pipeline: a rank exited without a report (exit codes {codes})")
                continue
            if status == "error":
                raise RuntimeError(f"torch pipeline: rank {rank} failed:\n{payload}")
            reports[rank] = payload
        return [reports[r] for r in range(world)]
    finally:
        for p in processes:
            p.join(max(0.0, min(5.0, end - time.monotonic())))
        _stop(processes)
        results.close()
        results.join_thread()


def run(dataset: str, model: str, split: list[int], microbatches: int, schedule: str, batch_size: int,
        steps: int, seed: int = 1, lr: float = 1e-3, warmup: int = 2, data=None, *, dropout: bool = True,
        deadline: float = DEADLINE_S, return_params: bool = False) -> dict:
    """Train `steps` steady steps (after `warmup`) with torch.distributed.pipelining; the measurements.

    split: the first layer index of each stage after the first ([2]: two stages, cut before
    layer 2). batch_size: the whole pipeline's batch, cut into `microbatches` equal
    micro-batches. Adam(lr) on nll_loss, the mean over the batch.

    Returns samples_per_s and step_s (steady steps); per stage, lists in stage order:
    stage_busy_s (forward + backward compute per step, the loss's on the last stage
    included), stage_forward_s (with the loss), stage_backward_s, stage_optimizer_s,
    bubble (1 - busy / step_s), peak_rss_mb and stage_parameters; losses (the batch's loss
    at every step, warmup steps included). With return_params also params and grads: each
    stage's parameters after the last step and their gradients in it (before the optimizer
    step), {name: array}, named as in nn.Sequential(*layers).
    """
    split = [int(i) for i in split]
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: one of {SCHEDULES}")
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be at least 1 and warmup at least 0")
    if microbatches < 1 or batch_size % microbatches:
        raise ValueError(f"batch size {batch_size} does not cut into {microbatches} equal micro-batches")
    n_layers = len(build_model(seed, dataset=dataset, model=model).layers())
    check_split(split, n_layers)
    world = len(split) + 1
    if schedule == "1f1b" and microbatches < world:
        raise ValueError(f"torch's Schedule1F1B needs at least as many micro-batches as stages "
                         f"({microbatches} < {world})")
    x, y = make_batches(dataset, batch_size, warmup + steps, seed, data)
    cfg = dict(dataset=dataset, model=model, split=split, microbatches=microbatches, schedule=schedule,
               batch_size=batch_size, steps=steps, warmup=warmup, seed=seed, lr=lr, dropout=dropout,
               shape=tuple(x.shape[2:]), deadline=deadline, return_params=return_params)
    reports = _launch(world, cfg, x, y, deadline)

    step_s = max(r["elapsed_s"] for r in reports) / steps
    busy = [r["forward_s"] + r["backward_s"] + r["loss_s"] for r in reports]
    result = {
        "dataset": dataset, "model": model, "split": split, "stages": world, "microbatches": microbatches,
        "schedule": schedule, "batch_size": batch_size, "steps": steps, "warmup": warmup, "seed": seed,
        "lr": lr, "dropout": dropout,
        "samples_per_s": batch_size / step_s,
        "step_s": step_s,
        "stage_busy_s": busy,
        "stage_forward_s": [r["forward_s"] + r["loss_s"] for r in reports],
        "stage_backward_s": [r["backward_s"] for r in reports],
        "stage_optimizer_s": [r["optimizer_s"] for r in reports],
        "bubble": [1 - b / step_s for b in busy],
        "losses": reports[-1]["losses"],
        "peak_rss_mb": [r["peak_rss_mb"] for r in reports],
        "stage_parameters": [r["parameters"] for r in reports],
    }
    if return_params:
        result["params"] = [r["params"] for r in reports]
        result["grads"] = [r["grads"] for r in reports]
    if not all(math.isfinite(v) for v in result["losses"]):
        result["nonfinite_loss"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=sorted(SHAPES))
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--split", type=int, nargs="+", default=[2],
                        help="first layer index of each stage after the first")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    parser.add_argument("--batch-size", type=int, default=64, help="the whole pipeline's batch")
    parser.add_argument("--steps", type=int, default=20, help="steady steps, measured")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the measured ones")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-dropout", action="store_true")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds before the ranks are killed")
    args = parser.parse_args(argv)
    result = run(args.dataset, args.model, args.split, args.microbatches, args.schedule, args.batch_size,
                 args.steps, seed=args.seed, lr=args.lr, warmup=args.warmup, dropout=not args.no_dropout,
                 deadline=args.deadline)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a pipeline cuts the model into stages: at boundaries of its chain of layers
(mnist.model: `layers()`), so that each stage's parameters are one slice of the flat buffers.

    --split time     balance the stages' measured forward + backward time (the default: the
                     slowest stage sets the pace of the whole pipeline)
    --split memory   balance the stages' parameters (what each worker must hold)
    --split 4,9      the first layer of each stage after the first, as given

The first two are resolved once, on the manager, into the third form, which config.json keeps.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from libe_cnn.buckets import Bucket
from libe_cnn.errors import UserError
from libe_cnn.runtime import available_cores, threads_per_worker

INPUT_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "iris": (4,)}


def balance(costs: list[float], k: int) -> list[int]:
    """The cut of `costs` into `k` non-empty runs whose largest sum is smallest: the first
    index of runs 2..k (the earliest such cut, for ties)."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} layers into {k} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[j][i]: the smallest largest run over cuts of costs[:i] into j runs; cut[j][i]: where the last starts.
    best = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for start in range(j - 1, i):
                worst = max(best[j - 1][start], prefix[i] - prefix[start])
                if worst < best[j][i]:
                    best[j][i], cut[j][i] = worst, start
    starts, i = [], n
    for j in range(k, 1, -1):
        i = cut[j][i]
        starts.append(i)
    return starts[::-1]


def parameter_counts(layers: list[nn.Module]) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in layers]


def layer_times(layers: list[nn.Module], x: torch.Tensor, repeats: int = 3) -> list[float]:
    """Each layer's forward + backward seconds on `x` (the best of `repeats`), one after the other."""
    times = []
    for layer in layers:
        x = x.detach().requires_grad_(x.is_floating_point())
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = layer(x)
            out.backward(torch.ones_like(out))
            best = min(best, time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
        times.append(best)
        with torch.no_grad():
            x = layer(x)
    return times


def parse_split(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def resolve_split(cfg, model: nn.Module, what: str) -> str:
    """The --split of `cfg` as the first layer of each stage after the first ("4,9"), checked
    against the model (`what` names it in errors). Raises UserError."""
    layers, k = model.layers(), cfg.stages
    if k > len(layers):
        raise UserError(f"--stages {k} is more than the {len(layers)} layers of {what}: at most {len(layers)}")
    if cfg.split == "memory":
        starts = balance([float(c) for c in parameter_counts(layers)], k)
    elif cfg.split == "time":
        threads = torch.get_num_threads()
        # Timed as a worker runs: on one micro-batch, with the threads it will have.
        torch.set_num_threads(threads_per_worker(available_cores(), cfg.n_workers))
        try:
            with torch.random.fork_rng(devices=[]):  # these draws must not move anyone's seed
                x = torch.randn(max(1, cfg.batch_size // cfg.microbatches), *INPUT_SHAPES[cfg.dataset])
                starts = balance(layer_times(layers, x), k)
        finally:
            torch.set_num_threads(threads)
    else:
        starts = parse_split(cfg.split)
        if len(starts) != k - 1 or starts != sorted(set(starts)) or not 0 < starts[0] <= starts[-1] < len(layers):
            wanted = "one layer number" if k == 2 else f"{k - 1} increasing layer numbers"
            raise UserError(f"--split {cfg.split} does not cut {what} ({len(layers)} layers, numbered from 0) into "
                            f"--stages {k}: give {wanted} from 1 to {len(layers) - 1}")
    return ",".join(map(str, starts))


def stage_bounds(split: str, n_layers: int) -> list[int]:
    """[0, first layer of stage 2, ..., n_layers]: stage s holds layers bounds[s] to bounds[s + 1] - 1."""
    return [0, *parse_split(split), n_layers]


def stage_buckets(model: nn.Module, split: str) -> list[Bucket]:
    """Each stage's parameters as a bucket of the flat buffers, numbered as backward finishes
    them: bucket 0 is the last stage's, bucket K - 1 the first's."""
    layers = model.layers()
    bounds, counts = stage_bounds(split, len(layers)), [len(list(layer.parameters())) for layer in layers]
    sizes = [p.numel() for p in model.parameters()]
    k = len(bounds) - 1
    buckets = []
    for stage in range(k):
        first, last = sum(counts[: bounds[stage]]), sum(counts[: bounds[stage + 1]])
        buckets.append(Bucket(k - 1 - stage, sum(sizes[:first]), sum(sizes[:last]), tuple(range(first, last))))
    return sorted(buckets, key=lambda b: b.index)


def stage_of_bucket(bucket: Bucket, n_stages: int) -> int:
    return n_stages - 1 - bucket.index

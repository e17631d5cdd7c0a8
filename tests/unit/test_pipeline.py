"""The pipeline's pure parts: the schedules, the balanced split, and each stage's slice of the model."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from libe_cnn.cli import config_from_args
from libe_cnn.errors import UserError
from libe_cnn.pipeline.schedule import Op, bubble_fraction, peak_stash, schedule
from libe_cnn.pipeline.split import balance, parameter_counts, resolve_split, stage_bounds, stage_buckets
from mnist.model import build_model

SHAPES = [(k, m) for k in range(1, 6) for m in range(1, 10)]


def run_pipeline(k: int, m: int, kind: str) -> list[tuple[int, Op]]:
    """Every stage's schedule run at once, each op when its inputs are there; the order done.
    Fails if the stages deadlock."""
    todo = {s: list(schedule(s, k, m, kind)) for s in range(k)}
    done: set[tuple[int, Op]] = set()
    order = []
    while any(todo.values()):
        ready = []
        for s, ops in todo.items():
            if not ops:
                continue
            op = ops[0]
            needs = ((s - 1, Op(True, op.microbatch)) if op.forward and s > 0 else
                     (s + 1, Op(False, op.microbatch)) if not op.forward and s < k - 1 else None)
            if needs is None or needs in done:
                ready.append((s, op))
        assert ready, f"deadlock with {todo}"
        for s, op in ready:
            todo[s].pop(0)
            done.add((s, op))
            order.append((s, op))
    return order


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("k, m", SHAPES)
def test_every_microbatch_goes_forward_then_backward_once_on_every_stage(kind, k, m):
    for s in range(k):
        ops = schedule(s, k, m, kind)
        assert sorted(ops) == sorted([Op(True, i) for i in range(m)] + [Op(False, i) for i in range(m)])
        assert all(ops.index(Op(True, i)) < ops.index(Op(False, i)) for i in range(m))
        # Each direction in micro-batch order: the neighbours' hand-offs arrive as they are needed.
        assert [o.microbatch for o in ops if o.forward] == list(range(m))
        assert [o.microbatch for o in ops if not o.forward] == list(range(m))
    run_pipeline(k, m, kind)  # and the stages together never deadlock


@pytest.mark.parametrize("k, m", SHAPES)
def test_1f1b_holds_at_most_k_minus_s_microbatches_and_gpipe_all(k, m):
    for s in range(k):
        assert peak_stash(schedule(s, k, m, "1f1b")) == min(k - s, m)
        assert peak_stash(schedule(s, k, m, "gpipe")) == m


def test_the_schedules_read_as_in_the_papers():
    assert schedule(0, 2, 4, "1f1b") == [Op(True, 0), Op(True, 1), Op(False, 0), Op(True, 2), Op(False, 1),
                                         Op(True, 3), Op(False, 2), Op(False, 3)]
    assert schedule(1, 2, 4, "1f1b") == [Op(True, 0), Op(False, 0), Op(True, 1), Op(False, 1), Op(True, 2),
                                         Op(False, 2), Op(True, 3), Op(False, 3)]
    assert repr(schedule(0, 3, 2, "gpipe")) == "[F0, F1, B0, B1]"
    assert bubble_fraction(2, 4) == pytest.approx(0.2) and bubble_fraction(4, 1) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        schedule(2, 2, 4, "1f1b")
    with pytest.raises(ValueError):
        schedule(0, 2, 4, "interleaved")


def brute_force(costs, k):
    best = None
    for cut in itertools.combinations(range(1, len(costs)), k - 1):
        bounds = [0, *cut, len(costs)]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        if best is None or worst < best:
            best = worst
    return best


def test_balance_finds_the_smallest_slowest_stage():
    rng = random.Random(0)
    for _ in range(200):
        costs = [rng.choice([0.1, 1, 2, 5, 9]) for _ in range(rng.randint(1, 9))]
        k = rng.randint(1, len(costs))
        starts = balance(costs, k)
        bounds = [0, *starts, len(costs)]
        assert len(starts) == k - 1 and all(a < b for a, b in zip(bounds, bounds[1:]))
        assert max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])) == pytest.approx(brute_force(costs, k))
    assert balance([1, 8, 1, 1], 2) == [2] and balance([1.0] * 4, 4) == [1, 2, 3]


@pytest.mark.parametrize("dataset, model, k", [("fashion-mnist", "cnn", 2), ("fashion-mnist", "cnn", 4),
                                               ("cifar10", "cnn", 3), ("iris", "cnn", 2),
                                               ("fashion-mnist", "resnet18-narrow", 4)])
def test_each_stage_is_one_slice_of_the_flat_buffers(dataset, model, k):
    net = build_model(0, dataset=dataset, model=model)
    layers = net.layers()
    split = ",".join(map(str, balance([1.0] * len(layers), k)))
    buckets = stage_buckets(net, split)
    assert [b.index for b in buckets] == list(range(k))
    by_stage = sorted(buckets, key=lambda b: b.start)  # the first stage's is the last bucket
    assert [b.index for b in by_stage] == list(range(k))[::-1]
    assert by_stage[0].start == 0 and by_stage[-1].stop == sum(p.numel() for p in net.parameters())
    assert all(a.stop == b.start for a, b in zip(by_stage, by_stage[1:]))
    bounds = stage_bounds(split, len(layers))
    for s, bucket in enumerate(by_stage):
        assert bucket.stop - bucket.start == sum(parameter_counts(layers[bounds[s]:bounds[s + 1]]))


def pipeline_config(*options):
    return config_from_args(["--parallelism", "pipeline", "--dataset", "fashion-mnist", *options])


def test_the_split_is_resolved_into_layer_numbers_and_checked():
    net = build_model(0, dataset="fashion-mnist", model="resnet18-narrow")
    assert resolve_split(pipeline_config("--split", "3"), net, "it") == "3"
    # The last blocks hold most parameters: balancing them cuts late.
    assert resolve_split(pipeline_config("--split", "memory"), net, "it") == "8"
    time_split = resolve_split(pipeline_config("--split", "time", "--stages", "3", "-n", "3"), net, "it")
    assert len(time_split.split(",")) == 2
    with torch.random.fork_rng(devices=[]):
        state = torch.random.get_rng_state()
        resolve_split(pipeline_config(), net, "it")
        assert torch.equal(state, torch.random.get_rng_state())  # measuring draws no one's numbers
    cnn = build_model(0, dataset="fashion-mnist")
    with pytest.raises(UserError, match="--stages 6 is more than the 4 layers of the cnn: at most 4"):
        resolve_split(pipeline_config("--stages", "6", "-n", "6"), cnn, "the cnn")
    for bad in ("0", "4", "2,3", "3,2"):
        with pytest.raises(UserError, match="does not cut the cnn"):
            resolve_split(pipeline_config("--split", bad), cnn, "the cnn")


@pytest.mark.parametrize("options, message", [
    (["-n", "3"], "-n 3 is not a multiple of --stages 2"),
    (["--stages", "1", "-n", "1"], "--stages must be at least 2"),
    (["--microbatches", "65"], "--microbatches 65 is more than --batch-size 64"),
    (["--microbatches", "0"], "--microbatches must be at least 1"),
    (["--strategy", "async"], "--strategy async does not apply"),
    (["--reduce-topology", "ring"], "reduces at the generator"),
    (["--split", "a,b"], "--split must be time, memory or"),
])
def test_pipeline_options_are_checked(options, message):
    with pytest.raises(UserError, match=message):
        pipeline_config(*options)


def test_pipeline_options_need_the_pipeline_and_default_when_it_is_on():
    with pytest.raises(UserError, match="--microbatches applies only to --parallelism pipeline"):
        config_from_args(["--microbatches", "4"])
    cfg = pipeline_config("-n", "4")
    assert (cfg.stages, cfg.microbatches, cfg.schedule, cfg.split, cfg.replicas) == (2, 4, "1f1b", "time", 2)
    assert config_from_args(["-n", "4"]).replicas == 4

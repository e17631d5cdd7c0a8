"""The shared-memory transport trains the same bits as Redis, in-process: sync (star and ring),
ring-allreduce, async, diloco and a pipeline; and it leaves nothing in shared memory."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import shm_leftovers

SMALL = ["-n", "2", "--limit-train", "512", "--batch-size", "16", "--max-steps", "4", "--eval-every", "2"]


def same_model(a, b) -> bool:
    first, second = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("options", [
    [],
    ["--reduce-topology", "ring"],
    ["--strategy", "ring-allreduce"],
    ["--strategy", "diloco", "--sync-period", "2"],
    ["--parallelism", "pipeline", "--microbatches", "4"],
], ids=["sync", "sync-ring", "ring-allreduce", "diloco", "pipeline"])
def test_shared_memory_trains_the_same_model_as_redis(run, options):
    shm, redis = (run(*SMALL, *options, "--transport", t, name=t) for t in ("shm", "redis"))
    transports = [json.loads((d / "summary.json").read_text())["transport"] for d in (shm, redis)]
    assert transports == ["shm", "redis"]
    assert same_model(shm, redis)
    assert shm_leftovers(shm) == []


def test_async_runs_over_shared_memory(run):
    # Async's order of arrival is not reproducible, so there is no bit-for-bit twin to compare with.
    run_dir = run(*SMALL, "--strategy", "async", "--transport", "shm")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["transport"] == "shm" and summary["completed"] and summary["store_bytes_per_step"] < 50_000
    assert shm_leftovers(run_dir) == []

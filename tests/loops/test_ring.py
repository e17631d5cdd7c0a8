"""Reducing among the workers, in-process: sync's ring topology (the workers reduce a chunk each,
the generator reads one reduced gradient: the same bits as star, over one server or two) and
--strategy ring-allreduce (the workers also gather the reduced chunks and step themselves)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from libe_cnn.store import run_keys
from tests.fake_ensemble import (
    prepare_in_process,
    run_ensemble_in_process,
    run_in_process,
    run_plan,
)

# 4 workers x 16 samples: 12 steps an epoch on 768 samples.
OPTIONS = ["-n", "4", "--limit-train", "768", "--batch-size", "16", "--max-steps", "6"]


def argv(data, *options):
    return ["--dataset", "fashion-mnist", "--data-dir", str(data), *OPTIONS, *options]


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir) -> list:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "event" not in r]


def same_model(a, b) -> bool:
    first, second = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_ring_over_two_servers_trains_the_same_bits_as_star_and_spreads_the_traffic(
        loop_data, redis_address, second_redis, tmp_path):
    star = run_in_process(argv(loop_data), redis_address, tmp_path, "star")  # the default on one machine
    plan = prepare_in_process(argv(loop_data, "--reduce-topology", "ring", "--transport", "redis"), redis_address,
                              tmp_path / "ring")  # the traffic spread is Redis's
    plan = dataclasses.replace(plan, more_redis=(second_redis,))
    ring = run_plan(plan, redis_address)
    s = summary(ring.run_dir)
    assert s["completed"] and s["reduce_topology"] == "ring" and summary(star)["reduce_topology"] == "star"
    assert same_model(star, ring.run_dir) and losses(star) == losses(ring.run_dir)
    # Every chunk was evicted once read, on both servers.
    assert ring.leftover_keys == [] and run_keys(second_redis, plan.config.run_id) == []
    # Workers 1-2 write to the first server and 3-4 to the second: each carries half the bytes.
    assert s["redis_servers"] == 2
    assert 0.4 < s["busiest_server_bytes_per_step"] / s["store_bytes_per_step"] < 0.6, s


def test_ring_stopped_and_resumed_ends_bit_for_bit_where_an_uninterrupted_run_does(loop_data, redis_address, tmp_path):
    options = argv(loop_data, "--reduce-topology", "ring", "--checkpoint-every", "2")
    whole = run_in_process(options, redis_address, tmp_path, "whole")
    stopped = run_in_process(options, redis_address, tmp_path, "stopped", stop_after=3 * 4 + 1)
    assert summary(stopped)["completed"] is False and summary(stopped)["steps"] in (3, 4)
    # Resumed with star: the topology may change on resume, the math does not.
    run_in_process(["--resume", str(stopped), "--reduce-topology", "star"], redis_address)
    assert summary(stopped)["completed"] and same_model(whole, stopped)
    assert losses(whole) == losses(stopped)


def test_ring_skips_non_finite_gradients_as_star_does(loop_data, redis_address, tmp_path):
    diverging = ["--optimizer", "sgd", "--lr", "1e20", "--no-dropout", "--on-nonfinite", "skip"]
    runs = {t: summary(run_in_process(argv(loop_data, *diverging, "--reduce-topology", t), redis_address, tmp_path, t))
            for t in ("star", "ring")}
    assert runs["ring"]["completed"] and runs["ring"]["nonfinite_skipped"] > 0
    assert runs["ring"]["nonfinite_skipped"] == runs["star"]["nonfinite_skipped"]
    assert same_model(tmp_path / "star", tmp_path / "ring")


def test_ring_allreduce_takes_the_steps_of_sync_with_the_mean(loop_data, redis_address, tmp_path):
    exact = ["--no-dropout", "--optimizer", "sgd", "--lr", "0.05"]
    sync = run_in_process(argv(loop_data, *exact, "--reduce", "mean"), redis_address, tmp_path, "sync")
    ring = run_ensemble_in_process(argv(loop_data, *exact, "--strategy", "ring-allreduce"), redis_address, tmp_path,
                                   "ring")
    assert summary(ring.run_dir)["completed"] and ring.leftover_keys == []
    first, second = (torch.load(d / "model.pt", weights_only=True) for d in (sync, ring.run_dir))
    for name, value in first.items():
        np.testing.assert_allclose(second[name].numpy(), value.numpy(), atol=1e-5, rtol=0, err_msg=name)
    assert [loss for _, loss in losses(ring.run_dir)] == pytest.approx([loss for _, loss in losses(sync)], abs=1e-5)


def test_ring_allreduce_stopped_and_resumed_ends_bit_for_bit_where_an_uninterrupted_run_does(
        loop_data, redis_address, tmp_path):
    options = argv(loop_data, "--strategy", "ring-allreduce", "--checkpoint-every", "2")
    whole = run_in_process(options, redis_address, tmp_path, "whole")
    stopped = run_in_process(options, redis_address, tmp_path, "stopped", stop_after=3 * 4 + 1)
    s = summary(stopped)
    assert s["completed"] is False and s["steps"] in (3, 4)
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["step"] == 2  # the workers' state is there
    run_in_process(["--resume", str(stopped)], redis_address)
    assert summary(stopped)["completed"] and same_model(whole, stopped)
    assert losses(whole) == losses(stopped)


def test_ring_allreduce_stops_at_a_non_finite_gradient_before_any_worker_steps(loop_data, redis_address, tmp_path):
    with pytest.raises(Exception) as raised:
        run_in_process(argv(loop_data, "--strategy", "ring-allreduce", "--optimizer", "sgd", "--lr", "1e20",
                            "--no-dropout"), redis_address, tmp_path)
    assert type(raised.value).__name__ == "NonFinite" and "non-finite gradient" in str(raised.value)
    s = summary(tmp_path / "run")
    assert s["completed"] is False and "non-finite" in s["error"]

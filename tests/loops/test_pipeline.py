"""Pipelines in-process (the real generator and stage simulators, a real Redis): the same
gradients as data parallelism, micro-batched or not, hybrid or not, and resumable bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


# 1024 samples: 32 steps an epoch at 32 per replica for one replica.
# SGD: Adam divides by the gradient's running size, and magnifies last-bit differences where it is near zero.
COMMON = ["--limit-train", "1024", "--batch-size", "32", "--no-dropout", "--seed", "4", "--reduce", "mean",
          "--optimizer", "sgd", "--lr", "0.05"]


@pytest.fixture
def run(run):
    """tests/loops' run, with COMMON first."""
    return lambda *options, **kw: run(*options, **kw) if "--resume" in options else run(*COMMON, *options, **kw)


def model(run_dir) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir) -> list:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "event" not in r]


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), atol=atol, rtol=0, err_msg=name)


PIPELINE = ("--parallelism", "pipeline", "--max-steps", "4")


def test_two_stages_one_microbatch_train_as_one_worker(run):
    """The stages split the model, not the math: K=2, M=1 is one process on the same batches."""
    whole = run("-n", "1", "--max-steps", "4", name="data")
    piped = run("-n", "2", *PIPELINE, "--microbatches", "1", "--split", "2", name="pipe")
    s = summary(piped)
    assert s["completed"] and (s["stages"], s["replicas"], s["microbatches"], s["split"]) == (2, 1, 1, "2")
    assert s["global_batch"] == 32 and s["samples"] == 4 * 32
    # One worker runs two threads here, each stage one: the convolutions may round differently.
    assert_close(model(piped), model(whole), atol=1e-6)
    np.testing.assert_allclose(losses(piped), losses(whole), rtol=1e-6)
    assert len(s["breakdown_s"]["stage_bubble"]) == 2


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_microbatches_sum_to_the_whole_batch(run, schedule):
    one = run("-n", "2", *PIPELINE, "--microbatches", "1", name="m1")
    four = run("-n", "2", *PIPELINE, "--microbatches", "4", "--schedule", schedule, name=f"m4-{schedule}")
    assert_close(model(four), model(one), atol=1e-5)
    np.testing.assert_allclose(losses(four), losses(one), rtol=1e-5)


def test_hybrid_replicas_train_as_sync_with_as_many_workers(run):
    """-n 4 --stages 2: two replicas of a two-stage pipeline, their gradients reduced as sync's two workers'."""
    sync = run("-n", "2", "--max-steps", "4", name="sync")
    hybrid = run("-n", "4", *PIPELINE, "--microbatches", "2", "--split", "1", name="hybrid")
    assert summary(hybrid)["replicas"] == 2 and summary(hybrid)["global_batch"] == 64
    assert_close(model(hybrid), model(sync), atol=1e-5)


def test_a_pipeline_resumes_bit_for_bit(run):
    options = ("-n", "2", "--parallelism", "pipeline", "--microbatches", "2", "--split", "2")
    straight = run(*options, "--max-steps", "6", name="straight")
    part = run(*options, "--max-steps", "3", name="part")
    run("--resume", str(part), "--max-steps", "6")
    assert summary(part)["completed"] and summary(part)["resumed_at_steps"] == [3]
    assert all(torch.equal(a, b) for a, b in zip(model(part).values(), model(straight).values()))
    assert losses(part) == losses(straight)


def test_a_resnet_in_four_stages_trains_as_one_worker(run):
    """GroupNorm is per sample: micro-batches of a ResNet give the whole batch's gradient."""
    resnet = ("--model", "resnet18-narrow", "--max-steps", "2", "--batch-size", "8")
    whole = run("-n", "1", *resnet, name="data")
    piped = run("-n", "4", "--parallelism", "pipeline", "--stages", "4", "--microbatches", "4", *resnet, name="pipe")
    assert len(summary(piped)["split"].split(",")) == 3
    assert_close(model(piped), model(whole), atol=1e-5)


DIVERGING = ("--parallelism", "pipeline", "--lr", "1e20", "--max-steps", "5", "--batch-size", "16")


def finite(run_dir) -> bool:
    return all(torch.isfinite(v).all() for v in model(run_dir).values())


def test_a_replica_whose_gradient_is_not_finite_is_skipped_and_counted(run):
    run_dir = run("-n", "4", *DIVERGING, "--on-nonfinite", "skip")
    s = summary(run_dir)
    assert s["completed"] and s["nonfinite_skipped"] > 0 and finite(run_dir)


def test_a_gradient_that_is_not_finite_stops_the_pipeline_naming_the_stage(run, tmp_path):
    with pytest.raises(Exception) as raised:
        run("-n", "2", *DIVERGING)
    assert type(raised.value).__name__ == "NonFinite", repr(raised.value)
    assert "non-finite gradient" in str(raised.value) and "worker" in str(raised.value)
    assert finite(tmp_path / "run") and summary(tmp_path / "run")["completed"] is False


def test_a_16_bit_wire_carries_parameters_and_gradients_in_half_the_bytes(run):
    """Activations stay float32: only the parameters' and gradients' share of the traffic halves."""
    runs = {wire: summary(run("-n", "2", "--parallelism", "pipeline", "--max-steps", "3", "--wire-dtype", wire,
                              "--transport", "redis", name=wire)) for wire in ("float32", "bfloat16")}
    assert all(s["completed"] and np.isfinite(s["train_loss"]) for s in runs.values())
    assert runs["bfloat16"]["store_bytes_per_step"] < 0.6 * runs["float32"]["store_bytes_per_step"]

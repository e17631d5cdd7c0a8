"""What a run reports as it goes: evaluations ten times per epoch by default (on a subset of
the test set between epoch ends), and the same numbers as TensorBoard events."""

from __future__ import annotations

import json

import pytest

# 1536 samples, 2 workers x 16: 48 steps an epoch, so the default evaluates every 4 steps.
OPTIONS = ["-n", "2", "--limit-train", "1536", "--batch-size", "16"]


def records(run_dir) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r], [r for r in lines if r.get("event") == "eval"]


def test_by_default_a_run_evaluates_ten_times_an_epoch_on_a_subset_and_at_its_end_on_everything(run):
    run_dir = run(*OPTIONS, "--max-steps", "10", "--eval-subset", "50")
    _, evals = records(run_dir)
    assert [(e["step"], e["test_samples"]) for e in evals] == [(4, 50), (8, 50), (10, 200)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] == evals[-1]["test_accuracy"] and summary["test_samples"] == 200


def test_eval_every_zero_evaluates_only_at_the_end(run):
    _, evals = records(run(*OPTIONS, "--max-steps", "10", "--eval-every", "0"))
    assert [(e["step"], e["test_samples"]) for e in evals] == [(10, 200)]


def test_tensorboard_gets_the_scalars_of_metrics_jsonl(run, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    board = tmp_path / "board"
    run_dir = run(*OPTIONS, "--max-steps", "6", "--eval-every", "3", "--tensorboard", str(board))
    steps, evals = records(run_dir)
    events = event_accumulator.EventAccumulator(str(board))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/samples_per_s", "train/sim_compute_s", "train/fetch_s",
                "eval/test_accuracy", "eval/test_loss"):
        assert tag in tags, tags
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"])) for r in steps]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("eval/test_accuracy")] == \
        [(r["step"], pytest.approx(r["test_accuracy"])) for r in evals] and len(evals) == 2


def test_a_resumed_run_replaces_the_tensorboard_steps_it_takes_again(run, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    board = tmp_path / "board"
    # param-avg's rounds end at 2, 3 (a checkpoint), 5, 6 and 8: stopped in the round after 5,
    # it resumes from its checkpoint at 3 and records step 5 again.
    options = [*OPTIONS, "--strategy", "param-avg", "--sync-period", "2", "--max-steps", "8",
               "--checkpoint-every", "3", "--tensorboard", str(board)]
    stopped = run(*options, name="stopped", stop_after=3 * 2 + 1)
    run("--resume", str(stopped))
    steps, _ = records(stopped)
    events = event_accumulator.EventAccumulator(str(board))
    events.Reload()
    assert json.loads((stopped / "summary.json").read_text())["resumed_at_steps"] == [3]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in steps] == [2, 3, 5, 6, 8]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps])

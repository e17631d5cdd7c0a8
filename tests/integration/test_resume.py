"""Checkpoints and --resume on real runs: a stopped and resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, run_cli

COMMON = ["-n", "2", "--dataset", "fashion-mnist", "--limit-train", "4096"]


def step_records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def same_model(a, b) -> bool:
    first, second = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_run_interrupted_with_ctrl_c_and_resumed_ends_bit_for_bit_where_an_uninterrupted_one_does(
        tmp_path, fashion_files):
    # 32 steps per epoch: the run crosses into a second epoch with its own data order. Dropout
    # stays on: its masks are drawn per worker and batch, so they repeat after a resume.
    options = [*COMMON, "--epochs", "2", "--max-steps", "40", "--checkpoint-every", "5"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    result = run_cli("run_libe_cnn.py", *options, "--run-dir", str(whole))
    assert result.returncode == 0, result.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, "run_libe_cnn.py", *options, "--run-dir", str(stopped)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((stopped / "metrics.jsonl").exists() and len(step_records(stopped)) >= 8):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    checkpoint = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert 8 <= checkpoint["step"] < 40  # the final checkpoint is at the step the run stopped, not at a multiple of 5
    assert json.loads((stopped / "summary.json").read_text())["completed"] is False

    result = run_cli("run_libe_cnn.py", "--resume", str(stopped))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after step {checkpoint['step']}" in result.stderr
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 40 and summary["resumed_at_steps"] == [checkpoint["step"]]
    assert same_model(whole, stopped)
    # The metrics read as one run: each step once, with the same losses.
    assert [(r["step"], r["loss"]) for r in step_records(stopped)] == [(r["step"], r["loss"]) for r in step_records(whole)]


@pytest.mark.parametrize("strategy", ["gossip"])  # easgd and the others: tests/loops
def test_periodic_strategies_resume_with_each_workers_own_state(tmp_path, fashion_files, strategy):
    """Workers of these strategies keep their own parameters and optimizer state between rounds."""
    options = [*COMMON, "--strategy", strategy, "--checkpoint-every", "3"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    for run_dir, steps in ((whole, "10"), (stopped, "6")):
        result = run_cli("run_libe_cnn.py", *options, "--max-steps", steps, "--run-dir", str(run_dir))
        assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["step"] == 6
    result = run_cli("run_libe_cnn.py", "--resume", str(stopped), "--max-steps", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert same_model(whole, stopped)


def test_async_resumes_from_each_workers_position(tmp_path, fashion_files):
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", *COMMON, "--strategy", "async", "--max-steps", "4", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 8 and sum(checkpoint["positions"]) == 8  # async counts single gradients
    result = run_cli("run_libe_cnn.py", "--resume", str(run_dir), "--max-steps", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 16 and summary["resumed_at_steps"] == [8]
    assert [r["step"] for r in step_records(run_dir)] == list(range(1, 17))


def test_resume_refuses_what_would_make_another_experiment(tmp_path, fashion_files):
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", *COMMON, "--max-steps", "3", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    for args, message in [
        (["--lr", "0.1"], "--lr cannot change when resuming"),
        (["-n", "3"], "-n cannot change when resuming"),
        ([], "already took its 3 steps: raise --epochs or --max-steps"),
        (["--run-dir", str(tmp_path / "other")], "name different directories"),
    ]:
        result = run_cli("run_libe_cnn.py", "--resume", str(run_dir), *args)
        errors = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == saved  # nothing touched

    (run_dir / "checkpoint.pt").write_bytes(saved["checkpoint.pt"][:1000])
    result = run_cli("run_libe_cnn.py", "--resume", str(run_dir), "--max-steps", "5")
    assert result.returncode == 2 and "checkpoint.pt is unreadable" in result.stderr, result.stderr
    (run_dir / "checkpoint.pt").unlink()
    result = run_cli("run_libe_cnn.py", "--resume", str(run_dir), "--max-steps", "5")
    assert result.returncode == 2 and "has no checkpoint.pt" in result.stderr, result.stderr
    result = run_cli("run_libe_cnn.py", "--resume", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "has no config.json" in result.stderr, result.stderr

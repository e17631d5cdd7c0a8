"""Ctrl-C and --resume on real runs: a stopped and resumed run ends where an uninterrupted one does.

The other strategies' resumes, the refusals and async's positions run in-process: tests/loops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import torch

from tests.conftest import ROOT, run_cli, shm_leftovers
from tests.integration.test_trainer import redis_servers


def step_records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def same_model(a, b) -> bool:
    first, second = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_run_interrupted_with_ctrl_c_and_resumed_ends_bit_for_bit_where_an_uninterrupted_one_does(
        tmp_path, fashion_files):
    # 16 steps per epoch: the run crosses into a second epoch with its own data order. Dropout
    # stays on: its masks are drawn per worker and batch, so they repeat after a resume.
    options = ["-n", "2", "--dataset", "fashion-mnist", "--limit-train", "2048", "--limit-test", "500",
               "--epochs", "2", "--max-steps", "24", "--checkpoint-every", "5"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    result = run_cli("run_libe_cnn.py", *options, "--run-dir", str(whole))
    assert result.returncode == 0, result.stderr[-3000:]

    servers_before = redis_servers()
    # As a terminal's foreground job: SIGINT at its default, even if this suite runs in the
    # background of a shell (which starts its jobs with SIGINT ignored).
    proc = subprocess.Popen([sys.executable, "run_libe_cnn.py", *options, "--run-dir", str(stopped)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((stopped / "metrics.jsonl").exists() and len(step_records(stopped)) >= 6):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    # It stops cleanly: no process and no private Redis left behind, the model and summary kept.
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert redis_servers() <= servers_before and shm_leftovers(stopped) == []
    assert (stopped / "model.pt").exists()
    checkpoint = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert 6 <= checkpoint["step"] < 24  # the final checkpoint is at the step the run stopped, not at a multiple of 5
    assert stderr.strip().splitlines()[-1] == (f"interrupted after step {checkpoint['step']}: "
                                               f"continue with --resume {stopped}")
    assert json.loads((stopped / "summary.json").read_text())["completed"] is False

    result = run_cli("run_libe_cnn.py", "--resume", str(stopped))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after step {checkpoint['step']}" in result.stderr
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 24 and summary["resumed_at_steps"] == [checkpoint["step"]]
    assert same_model(whole, stopped)
    # The metrics read as one run: each step once, with the same losses.
    assert [(r["step"], r["loss"]) for r in step_records(stopped)] == [(r["step"], r["loss"]) for r in step_records(whole)]

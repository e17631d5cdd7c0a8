"""Faults mid-run, tried on real processes: the run ends fast, says why, and keeps its model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from mnist.model import build_model
from tests.conftest import ROOT, run_cli, shm_leftovers
from tests.integration.test_trainer import redis_servers

DETECTION_LIMIT_S = 30


def start_run(run_dir, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run_libe_cnn.py", "-n", "2", "--dataset", "fashion-mnist", "--max-steps", "5000",
         "--eval-every", "5", "--limit-test", "500", "--checkpoint-every", "5", "--run-dir", str(run_dir), *options],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for_evaluation(run_dir, proc: subprocess.Popen) -> None:
    """Until the run has trained and saved its model at least once."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if metrics.exists() and '"event": "eval"' in metrics.read_text():
            return
        time.sleep(0.2)
    pytest.fail("the run never evaluated")


def children(proc: subprocess.Popen, name_part: str) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True)
            if name_part in " ".join(c.cmdline())]


def ends_fast_and_clean(proc: subprocess.Popen, killed_at: float, everyone: list[psutil.Process]) -> str:
    """The run exits non-zero within the limit, with one line of error, leaving no process."""
    _, stderr = proc.communicate(timeout=DETECTION_LIMIT_S + 30)
    took = time.monotonic() - killed_at
    assert proc.returncode == 1, stderr[-3000:]
    assert took < DETECTION_LIMIT_S, took
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    psutil.wait_procs(everyone, timeout=10)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return errors[0]


def model_is_intact(run_dir) -> None:
    build_model(0).load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))


def last_checkpoint_step(run_dir) -> int:
    """The step of checkpoint.pt: one the run reached, with a complete parent."""
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    build_model(0).load_state_dict(checkpoint["parent"])
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0 < checkpoint["step"] <= max(steps), checkpoint["step"]
    return checkpoint["step"]


def test_a_killed_simulator_ends_the_run_naming_the_worker(tmp_path, fashion_files):
    """While the workers reduce among themselves (ring, over two private servers): the others
    wait for the dead worker's chunks, the generator for its reduced one."""
    servers_before = redis_servers()
    run_dir = tmp_path / "run"
    proc = start_run(run_dir, "-n", "3", "--reduce-topology", "ring", "--redis-servers", "2", "--batch-size", "16")
    wait_for_evaluation(run_dir, proc)
    assert len(children(proc, "redis-server")) == 2
    sims = children(proc, "spawn_main")
    assert len(sims) == 3
    everyone = psutil.Process(proc.pid).children(recursive=True)
    killed_at = time.monotonic()
    os.kill(sims[1].pid, signal.SIGKILL)
    error = ends_fast_and_clean(proc, killed_at, everyone)
    assert "worker" in error and "stopped responding" in error, error
    model_is_intact(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False and "stopped responding" in summary["error"]
    assert redis_servers() <= servers_before
    assert summary["transport"] == "shm" and shm_leftovers(run_dir) == []
    # Nothing is lost: the run continues from its last checkpoint.
    step = last_checkpoint_step(run_dir)
    result = run_cli("run_libe_cnn.py", "--resume", str(run_dir), "--max-steps", str(step + 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == step + 2


def test_a_killed_redis_server_ends_the_run(tmp_path, fashion_files):
    run_dir = tmp_path / "run"
    proc = start_run(run_dir)
    wait_for_evaluation(run_dir, proc)
    [server] = children(proc, "redis-server")
    everyone = psutil.Process(proc.pid).children(recursive=True)
    killed_at = time.monotonic()
    server.kill()
    error = ends_fast_and_clean(proc, killed_at, everyone)
    assert "Redis" in error, error
    model_is_intact(run_dir)
    # What is kept is what the summary says: the last step the generator completed.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False and "Redis" in summary["error"], summary
    assert shm_leftovers(run_dir) == []
    checkpoint_step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert checkpoint_step == summary["checkpoint_step"] == summary["steps"], summary
    # Its metrics record is written after the step's parameters are published: it may be the one lost.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) in (checkpoint_step - 1, checkpoint_step)

# Non-finite gradients (stop, and skip) are detected by the generator: tests/loops, in-process.

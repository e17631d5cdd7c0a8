"""Pipelines on real processes: a run of two replicas of two stages through libEnsemble and a
private Redis, and a stage killed mid-run, which ends the run fast, naming it."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import psutil

from tests.conftest import run_cli
from tests.integration.test_faults import children, ends_fast_and_clean, model_is_intact, start_run, wait_for_evaluation
from tests.integration.test_trainer import redis_servers


def test_two_replicas_of_two_stages_train_and_report_their_bubble(tmp_path, fashion_files):
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "4", "--parallelism", "pipeline", "--dataset", "fashion-mnist",
                     "--limit-train", "2048", "--limit-test", "200", "--batch-size", "32", "--max-steps", "12",
                     "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 pipelines of 2 stages" in result.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["completed"] and s["steps"] == 12 and s["replicas"] == 2 and s["global_batch"] == 64
    assert s["test_accuracy"] > 0.3  # 12 steps of 64 on Fashion-MNIST: well above chance
    bubble = s["breakdown_s"]["stage_bubble"]
    assert len(bubble) == 2 and all(0.0 <= b < 1.0 for b in bubble)
    assert s["bubble_theory"] == 1 / 5  # K=2, M=4


def test_a_killed_stage_ends_the_run_naming_the_worker(tmp_path, fashion_files):
    run_dir, servers_before = tmp_path / "run", redis_servers()
    proc = start_run(run_dir, "--parallelism", "pipeline", "--batch-size", "32")
    wait_for_evaluation(run_dir, proc)
    sims = children(proc, "spawn_main")
    assert len(sims) == 2
    everyone = psutil.Process(proc.pid).children(recursive=True)
    killed_at = time.monotonic()
    os.kill(sims[0].pid, signal.SIGKILL)  # the first stage: the second waits for its activations
    error = ends_fast_and_clean(proc, killed_at, everyone)
    assert re.search(r"worker [12]\b", error) and "stopped responding" in error, error
    model_is_intact(run_dir)
    assert redis_servers() <= servers_before  # nothing left behind: processes (above) and the private server

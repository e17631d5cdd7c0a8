"""What a person at a terminal sees: a short first screen, and one line for Ctrl-C at any phase."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.conftest import ROOT, run_cli


def test_the_first_screen_is_a_few_lines_and_the_settings_go_to_config_json(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "iris", "--run-dir", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert not [line for line in lines if line.lstrip().startswith("{")]  # no settings as JSON on the screen
    assert f"run directory: {run_dir} (settings in config.json)" in lines
    assert json.loads((run_dir / "config.json").read_text())["dataset"] == "iris"
    # 50 epochs, each evaluated (metrics.jsonl has all 50); about ten on the screen, the last among them.
    evals = [line for line in lines if "test accuracy" in line]
    logged = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in logged if r.get("event") == "eval"]) == 50
    assert 5 <= len(evals) <= 11 and evals[-1].startswith("epoch 50 step 350:")
    assert len(lines) <= 20, result.stderr


def start(run_dir, *options: str) -> subprocess.Popen:
    """The trainer as a terminal's foreground job, with SIGINT at its default."""
    return subprocess.Popen([sys.executable, "run_libe_cnn.py", "-n", "2", "--dataset", "fashion-mnist",
                             "--max-steps", "200", "--run-dir", str(run_dir), *options], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def ctrl_c(proc: subprocess.Popen) -> tuple[str, float]:
    """Ctrl-C to the whole group, as a terminal sends it: (stderr, seconds until the trainer exited)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    return stderr, took


def test_ctrl_c_while_importing_is_one_line(tmp_path):
    proc = start(tmp_path / "run")
    time.sleep(0.5)  # torch is still being imported
    stderr, took = ctrl_c(proc)
    assert proc.returncode == 130 and stderr.strip() == "interrupted while starting: nothing was run", stderr
    assert took < 3 and not (tmp_path / "run").exists()


def test_ctrl_c_while_the_workers_start_is_one_line_naming_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    deadline = time.monotonic() + 60
    while not (run_dir / "config.json").exists():  # prepared: the workers are starting
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    stderr, took = ctrl_c(proc)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert last in ("interrupted before the first checkpoint: nothing to resume",
                    f"interrupted before the first step: continue with --resume {run_dir}"), stderr
    assert took < 5, took

"""A run whose disk fills up: one line naming the file and the cause, the last checkpoint kept, and
nothing else left behind; once there is room again, --resume finishes it.

The disk is a small tmpfs mounted for the test (root only), filled by the test while the run trains.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, run_cli, small_tmpfs


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    if not shutil.which("mount"):
        return "needs mount(8)"
    return None


pytestmark = pytest.mark.skipif(bool(_why_skip()), reason=_why_skip() or "")


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "64m") as where:
        yield where


def fill(directory) -> None:
    """Write zeros into directory/filler until the file system is full."""
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 20))
        except OSError:
            pass


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_disk, fashion_files):
    run_dir = small_disk / "run"
    options = ["-n", "2", "--dataset", "fashion-mnist", "--limit-train", "2048", "--limit-test", "200",
               "--checkpoint-every", "4", "--eval-every", "0"]
    proc = subprocess.Popen([sys.executable, "run_libe_cnn.py", *options, "--run-dir", str(run_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    time.sleep(0.5)
    fill(small_disk)  # mid-run, the disk fills up
    _, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode not in (0, None) and "Traceback" not in stderr, stderr
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert lines[-1].startswith(f"error: cannot write {run_dir}/"), stderr
    assert lines[-1].endswith(f": No space left on device; its checkpoint of step {kept} is kept: make room, then "
                              f"continue with --resume {run_dir}"), stderr
    assert 4 <= kept < 16 and kept % 4 == 0  # 16 steps in the epoch
    # Nothing but the run's own files: no half-written temporary, no libEnsemble abort dumps.
    left = sorted(p.name for p in run_dir.iterdir())
    assert not [name for name in left if name.startswith(".") or "_at_abort" in name], left

    (small_disk / "filler").unlink()
    result = run_cli("run_libe_cnn.py", "--resume", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after step {kept}" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["completed"]

"""Memory: a run that cannot fit is refused before it starts; simulators whose manager was killed
outright (as the kernel's out-of-memory killer does) end themselves within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from libe_cnn.redis_server import WORKDIR_PREFIX
from tests.conftest import ROOT, run_cli, shm_leftovers

GB = 2**30


def start(*options: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_libe_cnn.py", *options], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("phase", ["start-up", "training"])
def test_simulators_end_themselves_when_the_manager_is_killed(tmp_path, fashion_files, phase):
    run_dir = tmp_path / "run"
    proc = start("-n", "3", "--dataset", "fashion-mnist", "--max-steps", "400", "--checkpoint-every", "2",
                 "--run-dir", str(run_dir))
    deadline = time.monotonic() + 120
    manager = psutil.Process(proc.pid)

    def simulators() -> list[psutil.Process]:
        return [c for c in manager.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]

    # start-up: the simulators exist and are still importing; training: steps are being taken.
    while len(simulators()) < 3 or (phase == "training" and not (run_dir / "checkpoint.pt").exists()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    if phase == "start-up":
        time.sleep(1.0)
    children = manager.children(recursive=True)
    manager.kill()
    proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=6)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    for p in alive:  # in case of failure: leave nothing running
        p.kill()
    # What only the manager could remove, its shared memory and its Redis's directory, the next run removes.
    left = shm_leftovers(run_dir)
    redis_dirs = [d for d in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*")
                  if (d / "owner").is_file() and (d / "owner").read_text().split()[0] == str(proc.pid)]
    assert len(left) == 1 and len(redis_dirs) == 1
    result = run_cli("run_libe_cnn.py", "-n", "1", "--dataset", "iris", "--max-steps", "1",
                     "--run-dir", str(tmp_path / "next"), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not left[0].exists() and not redis_dirs[0].exists()


class MemoryCgroup:
    """A memory cgroup of its own (v2 or v1) with a limit; commands run inside it."""

    def __init__(self, limit: int) -> None:
        name = f"libe-cnn-test-{uuid.uuid4().hex[:8]}"
        v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
        if (v2 / "cgroup.controllers").exists():
            self.path, limit_file = v2 / name, "memory.max"
        elif v1.is_dir():
            self.path, limit_file = v1 / name, "memory.limit_in_bytes"
        else:
            raise OSError("no cgroup file system mounted")
        self.path.mkdir()
        try:
            (self.path / limit_file).write_text(str(limit))
        except OSError:
            self.path.rmdir()
            raise

    def argv(self, argv: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:  # its last process is still exiting
                time.sleep(0.1)


@pytest.fixture
def cgroup_of_3_gb():
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    try:
        group = MemoryCgroup(3 * GB)
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup here: {e}")
    yield group
    group.remove()


def test_a_run_that_cannot_fit_in_its_cgroup_is_refused_in_one_line(tmp_path, fashion_files, cgroup_of_3_gb):
    # As a batch job on a shared node is held: the machine has room, the job's cgroup does not.
    run_dir = tmp_path / "run"
    argv = [sys.executable, "run_libe_cnn.py", "-n", "16", "--dataset", "fashion-mnist", "--limit-train", "8192",
            "--batch-size", "8", "--max-steps", "4", "--eval-every", "0", "--limit-test", "500", "--run-dir", str(run_dir)]
    result = subprocess.run(cgroup_of_3_gb.argv(argv), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: -n 16 needs about ") and "is available here: use -n " in line, line
    assert not run_dir.exists()
    fits = int(line.rsplit("use -n ", 1)[1].split()[0])
    assert 1 <= fits < 16
    # What it says fits does: the same run with that many workers trains in the same cgroup.
    argv[argv.index("16")] = str(min(fits, 4))
    result = subprocess.run(cgroup_of_3_gb.argv(argv), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

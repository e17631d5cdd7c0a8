"""The trainer under libEnsemble's MPI comms, launched with a real mpiexec."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from libe_cnn.store import run_keys
from tests.conftest import ROOT

# Open MPI refuses root and more ranks than cores unless told; MPICH ignores these.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def test_mpiexec_three_ranks_two_workers(tmp_path, redis_address, fashion_files):
    mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: install Open MPI or MPICH (make test does)"
    run_dir = tmp_path / "run"
    env = {**os.environ, **MPI_ENV,
           "REDIS_URL": f"redis://:{redis_address.password}@{redis_address.host}:{redis_address.port}/0"}
    result = subprocess.run(
        [mpiexec, "-n", "3", sys.executable, "run_libe_cnn.py", "--comms", "mpi", "--dataset", "fashion-mnist",
         "--limit-train", "4096", "--max-steps", "30", "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_workers"] == 2 and summary["steps"] == 30 and summary["completed"]
    assert summary["test_accuracy"] > 0.5
    assert {"config.json", "metrics.jsonl", "model.pt", "ensemble.log"} <= {p.name for p in run_dir.iterdir()}
    config = json.loads((run_dir / "config.json").read_text())
    assert run_keys(redis_address, config["run_id"]) == []
    assert result.stdout.count("done:") == 1  # only the manager reports


def test_mpi_needs_a_reachable_redis(tmp_path):
    mpiexec = shutil.which("mpiexec")
    assert mpiexec
    result = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "run_libe_cnn.py", "--comms", "mpi", "--run-dir", str(tmp_path / "r")],
        cwd=ROOT, env={**os.environ, **MPI_ENV}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.count("--comms mpi needs --redis-host") == 1  # from rank 0 only
    assert "Traceback" not in result.stderr

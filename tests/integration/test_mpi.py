"""The trainer under libEnsemble's MPI comms, launched with a real mpiexec."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch

from libe_cnn.store import run_keys
from mnist.model import build_model
from tests.conftest import ROOT, run_cli
from tests.integration.test_trainer import redis_env, redis_servers, single_process_steps

# Open MPI refuses root and more ranks than cores unless told; MPICH ignores these.
# Open MPI 5 (conda-forge's) takes oversubscription from its PRRTE mapping policy instead.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
}


def mpirun(ranks: int, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """run_libe_cnn.py --comms mpi under a real mpiexec with `ranks` ranks."""
    mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: install Open MPI or MPICH (make test does)"
    return subprocess.run(
        [mpiexec, "-n", str(ranks), sys.executable, "run_libe_cnn.py", "--comms", "mpi", *options],
        cwd=ROOT, env={**(env or os.environ), **MPI_ENV}, capture_output=True, text=True, timeout=300,
    )


def our_processes() -> set[int]:
    """Python processes running this project's trainer or its spawned workers."""
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if any("run_libe_cnn.py" in part or "spawn_main" in part for part in p.info["cmdline"] or [])}


def test_mpi_needs_a_reachable_redis(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = mpirun(2, "--run-dir", str(tmp_path / "r"), env=env)
    assert result.returncode != 0
    assert result.stderr.count("--comms mpi needs a Redis every rank can reach") == 1  # from rank 0 only
    assert "Traceback" not in result.stderr


def test_local_and_mpi_comms_train_bitwise_the_same_model(tmp_path, fashion_files):
    """Same seed and data: the parent after K steps is the same under both comms, bit for bit.

    The generator reduces the gradients in shard order whichever worker reports first, and
    every process gets the same share of threads, so the float operations are identical.
    Under MPI the run also starts its own private Redis (--redis-bind), which every rank
    reaches through the plan and which is gone when the job ends, with every rank.
    Both equal one process stepping on the union batch (tests/loops checks it in-process too).
    """
    seed, n_train, batch, steps, lr = 3, 1024, 16, 4, 0.05
    options = ["--dataset", "fashion-mnist", "--limit-train", str(n_train), "--batch-size", str(batch),
               "--max-steps", str(steps), "--no-dropout", "--optimizer", "sgd", "--lr", str(lr), "--reduce", "mean",
               "--seed", str(seed), "--limit-test", "200"]
    servers_before, processes_before = redis_servers(), our_processes()
    local = run_cli("run_libe_cnn.py", "-n", "2", *options, "--run-dir", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    mpi = mpirun(3, *options, "--redis-bind", "127.0.0.1", "--run-dir", str(tmp_path / "mpi"), env=env)
    assert mpi.returncode == 0, mpi.stderr[-3000:]
    assert mpi.stdout.count("done:") == 1  # only the manager reports
    assert our_processes() <= processes_before  # no rank left behind
    assert redis_servers() <= servers_before
    a = torch.load(tmp_path / "local" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "mpi" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    reference = single_process_steps(fashion_files, seed, n_train, 2, batch, steps, lr)
    initial = build_model(seed, dropout=False).state_dict()
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        np.testing.assert_allclose(a[name].numpy(), value.numpy(), atol=1e-5, rtol=0, err_msg=name)
    run_dir = tmp_path / "mpi"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_workers"] == 2 and summary["steps"] == 4 and summary["completed"]
    assert {"config.json", "metrics.jsonl", "model.pt", "ensemble.log"} <= {p.name for p in run_dir.iterdir()}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["redis_bind"] == "127.0.0.1" and config["redis_password"] is None


def test_an_external_redis_is_left_running_and_clean(tmp_path, redis_address, fashion_files):
    """The multi-node setup: every rank reaches the user's Redis (REDIS_URL); local comms use it in test_strategies.

    Over a 16-bit wire (tests/loops measures its traffic): both ends of the codec in real processes.
    """
    run_dir = tmp_path / "run"
    result = mpirun(3, "--dataset", "fashion-mnist", "--limit-train", "2048", "--max-steps", "3",
                    "--limit-test", "200", "--wire-dtype", "bfloat16", "--run-dir", str(run_dir),
                    env=redis_env(redis_address))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["wire_dtype"] == "bfloat16" and summary["steps"] == 3 and np.isfinite(summary["test_loss"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["redis_host"] == redis_address.host
    assert redis_address.password not in (run_dir / "config.json").read_text()
    assert redis_address.password not in (run_dir / "ensemble.log").read_text()
    assert run_keys(redis_address, config["run_id"]) == []
    with redis_address.client() as client:
        assert client.ping()


def test_a_pipeline_trains_the_same_model_under_mpi_as_under_local_comms(tmp_path, fashion_files):
    """Two stages on two ranks: activations and their gradients cross between ranks through the store."""
    options = ["--dataset", "fashion-mnist", "--parallelism", "pipeline", "--microbatches", "2", "--split", "2",
               "--limit-train", "1024", "--batch-size", "32", "--max-steps", "3", "--no-dropout", "--limit-test", "200"]
    local = run_cli("run_libe_cnn.py", "-n", "2", *options, "--run-dir", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    mpi = mpirun(3, *options, "--redis-bind", "127.0.0.1", "--run-dir", str(tmp_path / "mpi"), env=env)
    assert mpi.returncode == 0, mpi.stderr[-3000:]
    a = torch.load(tmp_path / "local" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "mpi" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    summary = json.loads((tmp_path / "mpi" / "summary.json").read_text())
    assert summary["completed"] and summary["stages"] == 2 and summary["split"] == "2"


def test_without_mpi4py_each_launch_says_in_one_line_to_run_make_setup_mpi(tmp_path):
    # An environment where mpi4py cannot be imported, as in a venv made by `make setup` alone.
    hidden = tmp_path / "no-mpi4py"
    hidden.mkdir()
    (hidden / "mpi4py.py").write_text("raise ModuleNotFoundError(\"No module named 'mpi4py'\", name='mpi4py')\n")
    env = {**os.environ, "PYTHONPATH": str(hidden)}
    result = mpirun(3, "--dataset", "iris", "--redis-bind", "127.0.0.1", "--run-dir", str(tmp_path / "r"), env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("error: --comms mpi needs mpi4py") == 1, result.stderr  # from rank 0 only
    assert "make setup-mpi" in result.stderr and not (tmp_path / "r").exists()


def is_open_mpi() -> bool:
    version = subprocess.run(["mpiexec", "--version"], capture_output=True, text=True).stdout
    return "Open MPI" in version or "OpenRTE" in version


@pytest.mark.skipif(not shutil.which("mpiexec") or not is_open_mpi(), reason="the Open MPI line needs Open MPI")
def test_the_printed_open_mpi_line_runs_as_printed(tmp_path):
    from libe_cnn.redis_server import free_port

    run_dir = tmp_path / "run"
    printed = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "iris", "--max-steps", "3", "--redis-port",
                      str(free_port()), "--run-dir", str(run_dir), "--print-launch", timeout=60)
    assert printed.returncode == 0, printed.stderr
    line = next(line for line in printed.stdout.splitlines() if "--map-by node" in line)
    hosts = tmp_path / "HOSTS"
    hosts.write_text("localhost slots=3\n")  # both "nodes" are this one
    # As printed (as root it carries --allow-run-as-root), without the suite's MPI variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PRTE_"))}
    result = subprocess.run(shlex.split(line.replace("HOSTS", str(hosts))), cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["completed"]

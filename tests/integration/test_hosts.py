"""The trainer across hosts: two network namespaces on a shaped link (multinode/netns.py),
ranks launched into them by a real mpiexec, a private Redis on each host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from multinode.netns import Hosts
from tests.conftest import ROOT, run_cli
from tests.integration.test_mpi import MPI_ENV, our_processes
from tests.integration.test_netns import pytestmark as needs_hosts
from tests.integration.test_trainer import redis_servers

PREFIX = "lcnnrun"
pytestmark = needs_hosts  # root, and network namespaces permitted


@pytest.mark.skipif(not shutil.which("mpiexec"), reason="mpiexec not found: install Open MPI (make setup-mpi)")
def test_two_hosts_train_the_same_model_as_local_comms_each_worker_on_its_hosts_server(tmp_path):
    """Rank 0 (the manager) and worker 1 on host 0, worker 2 on host 1, over a 1 Gbit/s link.

    The gradients cross the link as they would between nodes; the parent is the same as under
    local comms, bit for bit, and every server and rank is gone at the end.
    """
    options = ["--dataset", "fashion-mnist", "--limit-train", "1024", "--batch-size", "16", "--max-steps", "4",
               "--no-dropout", "--optimizer", "sgd", "--lr", "0.05", "--reduce", "mean", "--seed", "3",
               "--limit-test", "200"]
    local = run_cli("run_libe_cnn.py", "-n", "2", *options, "--run-dir", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    servers_before, processes_before = redis_servers(), our_processes()
    env = {**{k: v for k, v in os.environ.items() if k != "REDIS_URL"}, **MPI_ENV}
    with Hosts(2, rate="1gbit", prefix=PREFIX) as hosts:
        launch = [shutil.which("mpiexec"), *hosts.mpiexec_options(slots=2), "-n", "3", sys.executable,
                  str(ROOT / "run_libe_cnn.py"), "--comms", "mpi", "--redis-bind", hosts.address(0),
                  "--redis-per-host", *options, "--run-dir", str(tmp_path / "hosts")]
        result = subprocess.run(hosts.argv(0, launch), cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        host_addresses = [hosts.address(0), hosts.address(1)]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "hosts" / "summary.json").read_text())
    assert summary["completed"] and summary["redis_servers"] == 2
    assert [s.split(":")[0] for s in summary["worker_servers"]] == host_addresses
    a = torch.load(tmp_path / "local" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "hosts" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert our_processes() <= processes_before and redis_servers() <= servers_before

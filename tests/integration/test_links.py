"""benchmarks/links.py end to end, small: two hosts, DDP and one trainer contender, then nothing left behind."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from multinode import netns
from tests.conftest import ROOT
from tests.integration.test_mpi import our_processes
from tests.integration.test_netns import pytestmark as needs_hosts
from tests.integration.test_trainer import redis_servers

PREFIX = "lcnnlinkt"  # not the benchmark's own prefix: a benchmark running meanwhile is left alone
pytestmark = [
    needs_hosts,  # root, and network namespaces permitted
    pytest.mark.skipif(not shutil.which("mpiexec"), reason="mpiexec not found: install Open MPI (make setup-mpi)"),
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed (make setup-mpi)"),
]


@pytest.fixture(autouse=True)
def clean():
    netns.down(PREFIX)
    yield
    netns.down(PREFIX)


def test_two_hosts_ddp_and_diloco_are_measured_reported_and_leave_nothing_behind(tmp_path):
    """32 steps on 4096 samples, evaluated every 8: both reach 50% (at the first evaluation or
    a later one), the trainer stopped there by SIGINT to its manager."""
    servers_before, processes_before = redis_servers(), our_processes()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.links", "--hosts", "2", "--rates", "unshaped", "--contenders", "ddp",
         "diloco-h8", "--limit-train", "4096", "--limit-test", "500", "--target", "0.5", "--budget-s", "30",
         "--prefix", PREFIX, "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "links-h2.json").read_text())
    assert data["settings"]["2"]["grid"] == [8, 16, 24, 32]
    contenders = data["results"]["2"]["unshaped"]
    assert list(contenders) == ["ddp", "diloco-h8"]
    for name, got in contenders.items():
        assert "error" not in got, (name, got["error"])
        assert got["stopped"] in ("target", "epochs") and got["time_to_target_s"] > 0
        assert got["steady_samples_per_s"] > 0 and got["bytes_per_sample"] > 0
        assert got["curve"] and {p["step"] for p in got["curve"]} <= {8, 16, 24, 32}
        assert 0.5 <= got["final_accuracy"] <= 1 and got["leftover_processes"] == 0
    # One worker's server on each host: the trainer ran across both.
    servers = contenders["diloco-h8"]["summary"]["worker_servers"]
    assert [s.split(":")[0] for s in servers] == [netns.address(0, PREFIX), netns.address(1, PREFIX)]
    table = (tmp_path / "links-h2.md").read_text()
    assert "| ddp |" in table and "| diloco-h8 |" in table and "failed" not in table
    assert (tmp_path / "links-h2.png").stat().st_size > 0
    # Nothing left: hosts, agent, ranks, DDP processes, private servers. Only what names this
    # test's hosts counts (the trainer's ranks and servers their subnet, mpiexec and its daemons
    # the agent or the subnet): other jobs may start and end trainers and servers meanwhile.
    assert netns.host_names(PREFIX) == [] and not Path(f"/run/{PREFIX}-netns").exists()
    assert redis_servers() <= servers_before
    assert not [pid for pid in our_processes() - processes_before if pid in naming_these_hosts()]
    assert naming_these_hosts() == {}


def naming_these_hosts() -> dict[int, str]:
    marks = (PREFIX, netns.subnet(PREFIX) + ".", "ddp-rank")
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if any(mark in line for mark in marks):
            found[p.pid] = line
    return found

"""multinode/netns.py on real network namespaces: addresses, names, shaping, cleanup, mpiexec."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import pytest

from multinode import netns
from multinode.netns import Hosts
from tests.conftest import ROOT
from tests.integration.test_mpi import MPI_ENV

PREFIX = "lcnntest"  # not the default prefix: a user's own hosts are left alone
PY = sys.executable


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2's `ip` is not installed"
    probe = subprocess.run(["ip", "netns", "add", "lcnnprobe"], capture_output=True, text=True)
    if probe.returncode:
        return f"`ip netns add` is not permitted here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", "lcnnprobe"], capture_output=True)
    return None


pytestmark = pytest.mark.skipif(bool(_why_skip()), reason=_why_skip() or "")
needs_tc = pytest.mark.skipif(not shutil.which("tc"), reason="shaping needs iproute2's `tc`")


# serve PORT COUNT: answer COUNT connections with "HOSTNAME BYTES" once the client has sent all.
# send HOST PORT BYTES: send BYTES, print the answer and the seconds until it came.
TCP = r"""
import socket, sys, time
if sys.argv[1] == "serve":
    server = socket.create_server(("0.0.0.0", int(sys.argv[2])))
    print("ready", flush=True)
    for _ in range(int(sys.argv[3])):
        conn, _ = server.accept()
        with conn:
            total = 0
            while data := conn.recv(1 << 16):
                total += len(data)
            conn.sendall(f"{socket.gethostname()} {total}".encode())
else:
    host, port, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with socket.create_connection((host, port), timeout=30) as conn:
        start = time.perf_counter()
        conn.sendall(bytes(size))
        conn.shutdown(socket.SHUT_WR)
        answer = conn.recv(100).decode()
        print(answer, time.perf_counter() - start)
"""
PORT = "47311"


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "multinode.netns", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, **kw)


def leftovers() -> list[str]:
    """Everything of ours still on the machine: namespaces, links, /etc/netns dirs, runtime files."""
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = [line.split()[0] for line in subprocess.run(["ip", "-br", "link"], capture_output=True,
                                                        text=True).stdout.splitlines()]
    files = [str(p) for p in [*Path("/etc/netns").glob(PREFIX + "*"), *Path("/run").glob(PREFIX + "*")]]
    return [x for x in spaces + links if x.startswith(PREFIX)] + files


@pytest.fixture(autouse=True)
def clean():
    netns.down(PREFIX)
    yield
    netns.down(PREFIX)


def serve(hosts: Hosts, i: int, count: int) -> subprocess.Popen:
    server = hosts.popen(i, [PY, "-c", TCP, "serve", PORT, str(count)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    return server


def send(where: Callable[[list[str]], list[str]], target: str, size: int) -> tuple[str, int, float]:
    """(the server's host name, the bytes it got, the seconds it took) for one transfer to target.

    `where` turns an argv into the one that runs it in the sending host (`list`: the root namespace).
    """
    out = subprocess.run(where([PY, "-c", TCP, "send", target, PORT, str(size)]), capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0], int(out[1]), float(out[2])


def test_hosts_reach_each_other_by_address_and_name_and_have_their_own_hostnames():
    root_name = socket.gethostname()
    with Hosts(2, prefix=PREFIX) as hosts:
        assert hosts.names == [f"{PREFIX}0", f"{PREFIX}1"] and hosts.interface == "eth0"
        servers = [serve(hosts, i, 3) for i in range(2)]
        for i, j in ((0, 1), (1, 0)):
            for target in (hosts.address(j), hosts.names[j]):
                assert send(partial(hosts.argv, i), target, 1000)[:2] == (hosts.names[j], 1000)
            # The root namespace through the bridge (10.231.N.254 on the same /24).
            assert send(list, hosts.address(j), 1000)[:2] == (hosts.names[j], 1000)
        assert [s.wait(timeout=10) for s in servers] == [0, 0]
        for i, name in enumerate(hosts.names):
            inside = subprocess.run(hosts.argv(i, ["sh", "-c", f"hostname; {PY} -c 'import socket; "
                                                   "print(socket.gethostname())'; ip -4 -o addr show eth0"]),
                                    capture_output=True, text=True, check=True).stdout.split("\n")
            assert inside[:2] == [name, name]
            assert f"inet {hosts.address(i)}/24" in inside[2]
        assert hosts.bridge_address.endswith(".254") and hosts.address(0).endswith(".1")
    assert socket.gethostname() == root_name


@needs_tc
def test_shaping_limits_the_rate_on_both_ends_of_every_link():
    size, rate = 4_000_000, 20e6  # 4 MB at 20 Mbit/s: at least 1.6 s, bar a 256 kB burst
    with Hosts(2, rate="20mbit", prefix=PREFIX) as hosts:
        for i, name in enumerate(hosts.names):
            for ns in ([], ["-n", name]):
                dev = "eth0" if ns else f"{PREFIX}v{i}"
                shown = subprocess.run(["tc", *ns, "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout
                assert "tbf" in shown and "rate 20Mbit" in shown, (dev, shown)
        assert "tbf send 20Mbit receive 20Mbit" in cli("status", "--prefix", PREFIX).stdout
        server = serve(hosts, 1, 1)
        _, got, shaped = send(partial(hosts.argv, 0), hosts.names[1], size)
        server.wait(timeout=10)
    assert got == size
    assert shaped >= size * 8 / rate * 0.8
    with Hosts(2, prefix=PREFIX) as hosts:
        assert "unshaped" in cli("status", "--prefix", PREFIX).stdout
        server = serve(hosts, 1, 1)
        _, got, unshaped = send(partial(hosts.argv, 0), hosts.names[1], size)
        server.wait(timeout=10)
    assert got == size and unshaped * 3 < shaped


def started_sleep(hosts: Hosts) -> subprocess.Popen:
    sleeper = hosts.popen(1, ["sleep", "1000"])
    deadline = time.monotonic() + 10
    while str(sleeper.pid) not in subprocess.run(["ip", "netns", "pids", hosts.names[1]], capture_output=True,
                                                 text=True).stdout.split():
        assert time.monotonic() < deadline, "sleep never showed up in the host"
        time.sleep(0.02)
    return sleeper


@needs_tc
def test_down_leaves_nothing_and_stops_what_runs_inside():
    with Hosts(2, rate="100mbit", prefix=PREFIX) as hosts:
        sleeper = started_sleep(hosts)
        assert len(leftovers()) == 2 + 3 + 2 + 1  # namespaces; bridge and veths; /etc/netns dirs; runtime dir
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    assert leftovers() == []


def test_an_exception_inside_the_block_still_cleans_everything():
    with pytest.raises(RuntimeError, match="boom"):
        with Hosts(2, prefix=PREFIX) as hosts:
            sleeper = started_sleep(hosts)
            raise RuntimeError("boom")
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    assert leftovers() == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_interrupted_partway_removes_what_it_made(sig):
    up = subprocess.Popen([PY, "-m", "multinode.netns", "up", "--hosts", "60", "--prefix", PREFIX], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while f"{PREFIX}1" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        assert time.monotonic() < deadline and up.poll() is None
        time.sleep(0.01)
    up.send_signal(sig)
    out, err = up.communicate(timeout=30)
    assert up.returncode == 130 and out == "" and err.count("\n") == 1, err
    assert leftovers() == []
    assert [cli("down", "--prefix", PREFIX).returncode for _ in range(2)] == [0, 0]
    assert leftovers() == []


def test_up_refuses_when_the_hosts_exist():
    with Hosts(1, prefix=PREFIX) as hosts:
        result = cli("up", "--hosts", "2", "--prefix", PREFIX)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and f"python -m multinode.netns down --prefix {PREFIX}" in result.stderr
        assert cli("status", "--prefix", PREFIX).stdout.split()[:2] == [hosts.names[0], hosts.address(0)]


NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def closed_directory(path: Path) -> Path | None:
    """The first directory above `path` (or above what its links lead to) that other users may
    not enter: no o+x, as a mode 0700 home or `mktemp -d`."""
    for chain in (path, path.resolve()):
        for directory in reversed(chain.parents):
            if not directory.stat().st_mode & 0o001:
                return directory
    return None


@pytest.fixture
def readable_copy():
    """What `python -m multinode.netns` imports (multinode/ and libe_cnn.errors), copied into a
    directory every user can read: the checkout itself may be private (a clone in a 0700 home or
    `mktemp -d`), and pytest's tmp_path lies under a 0700 directory too."""
    top = Path(tempfile.mkdtemp(prefix="lcnn-netns-", dir="/tmp"))
    try:
        shutil.copytree(ROOT / "multinode", top / "multinode", ignore=shutil.ignore_patterns("__pycache__"))
        (top / "libe_cnn").mkdir()
        for name in ("__init__.py", "errors.py"):
            shutil.copyfile(ROOT / "libe_cnn" / name, top / "libe_cnn" / name)
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield top
    finally:
        shutil.rmtree(top)


def test_not_root_refuses_in_one_line(readable_copy):
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("cannot drop privileges to nobody: util-linux's setpriv is not installed")
    drop = [setpriv, *NOBODY]
    if subprocess.run([*drop, PY, "-c", ""], cwd="/", capture_output=True).returncode:
        closed = closed_directory(Path(PY))
        where = f": it lies under {closed}, which only its owner may enter (mode 0700)" if closed else ""
        pytest.skip(f"user nobody cannot run this interpreter, {PY}{where}; use a venv every user can reach")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the copy, as nobody reads it
    probe = subprocess.run([*drop, PY, "-c", "import os; os.listdir('multinode'); import libe_cnn.errors as e; "
                            "print(e.__file__)"], cwd=readable_copy, env=env, capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"user nobody cannot read the copy in {readable_copy}: {last}")
    assert probe.stdout.strip() == str(readable_copy / "libe_cnn" / "errors.py")  # the copy, not the checkout
    for args in (["up", "--hosts", "1", "--prefix", PREFIX], ["down", "--prefix", PREFIX], ["exec", "x", "--", "true"]):
        result = subprocess.run([*drop, PY, "-m", "multinode.netns", *args], cwd=readable_copy, env=env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "needs root" in result.stderr, result.stderr
    assert leftovers() == []


def test_exec_and_rsh_pass_streams_and_exit_codes():
    with Hosts(1, prefix=PREFIX) as hosts:
        name = hosts.names[0]
        assert cli("exec", name, "--", "sh", "-c", "exit 7").returncode == 7
        echoed = cli("exec", name, "--", "sh", "-c", "cat; hostname", input="hello\n")
        assert (echoed.returncode, echoed.stdout) == (0, f"hello\n{name}\n")
        # rsh joins its words for `sh -c`, as ssh does; mpiexec quotes what needs it.
        assert cli("rsh", name, "echo", '"a;b"', "$(hostname);", "exit", "5").stdout == f"a;b {name}\n"
        assert cli("rsh", name, "exit", "5").returncode == 5
        unknown = cli("exec", f"{PREFIX}9", "--", "true")
        assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "unknown host" in unknown.stderr


MPI_PING = r"""
import json, socket, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
data = np.zeros(2_500_000, dtype=np.uint8)
comm.Barrier()
start = time.perf_counter()
if comm.rank == 0:
    comm.Send(data, dest=1)
    comm.Recv(data[:1], source=1)
else:
    comm.Recv(data, source=0)
    comm.Send(data[:1], dest=0)
# Rank 0 prints for both: lines that two ranks print may reach mpiexec interleaved.
ranks = comm.gather((socket.gethostname(), time.perf_counter() - start), root=0)
if comm.rank == 0:
    print(json.dumps(ranks))
"""


@needs_tc
@pytest.mark.skipif(not shutil.which("mpiexec"), reason="mpiexec not found: install Open MPI")
def test_mpiexec_runs_across_the_hosts_over_the_shaped_link():
    with Hosts(2, rate="20mbit", prefix=PREFIX) as hosts:
        mpiexec = [shutil.which("mpiexec"), "-n", "2", *hosts.mpiexec_options()]
        env = {**os.environ, **MPI_ENV}
        names = subprocess.run(hosts.argv(0, [*mpiexec, "hostname"]), capture_output=True, text=True, env=env,
                               timeout=60)
        assert sorted(names.stdout.split()) == hosts.names, names.stderr
        if importlib.util.find_spec("mpi4py") is None:
            pytest.skip("mpi4py is not installed (make setup-mpi)")
        ping = subprocess.run(hosts.argv(0, [*mpiexec, PY, "-c", MPI_PING]), capture_output=True, text=True,
                              env=env, timeout=60)
    assert ping.returncode == 0, ping.stderr
    ranks = json.loads(ping.stdout)
    assert [name for name, _ in ranks] == hosts.names
    # 2.5 MB at 20 Mbit/s is 1 s: only a transfer through the shaped veths takes that long.
    assert min(seconds for _, seconds in ranks) >= 2_500_000 * 8 / 20e6 * 0.8

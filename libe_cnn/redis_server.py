"""A private redis-server for one run: loopback, free port, random password.

The password reaches the server through its standard input (`redis-server -`), so it
never shows in a process listing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from libe_cnn.errors import UserError
from libe_cnn.owned_dirs import mark_owned, remove_orphans
from libe_cnn.store import RedisAddress

if TYPE_CHECKING:
    from contextlib import ExitStack

INSTALL_HINT = (
    "redis-server not found: install it (Debian/Ubuntu: sudo apt-get install redis-server; "
    "macOS: brew install redis; pixi: pixi add redis-server) or pass --redis-host HOST"
)


WORKDIR_PREFIX = "libe-cnn-redis-"  # the server's directory (its log) in the temporary directory


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # If the manager is killed outright, take the server down with it (Linux only).
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # Own process group, so Ctrl-C reaches the manager, which then stops the server in order.
    os.setpgrp()


class PrivateRedis:
    """Start a redis-server for this run; stop it on exit (also on error or Ctrl-C)."""

    def __init__(self, bind: str = "127.0.0.1", port: int | None = None, startup_timeout: float = 10.0) -> None:
        self.bind = bind
        self.port = port  # None: a free one
        self.startup_timeout = startup_timeout
        self.password = secrets.token_hex(24)  # never starts with '-', which a command line would take for an option
        self.process: subprocess.Popen | None = None
        self.address: RedisAddress | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    def start(self) -> RedisAddress:
        binary = shutil.which("redis-server")
        if binary is None:
            raise UserError(INSTALL_HINT)
        for _ in range(1 if self.port else 5):  # a free port can be taken between probing and binding
            port = self.port or free_port(self.bind)
            remove_orphans(Path(tempfile.gettempdir()), WORKDIR_PREFIX)  # of runs killed outright
            self._workdir = tempfile.TemporaryDirectory(prefix=WORKDIR_PREFIX)
            mark_owned(Path(self._workdir.name))
            conf = "\n".join(
                [
                    f"bind {self.bind}",
                    f"port {port}",
                    f"requirepass {self.password}",
                    "protected-mode yes",
                    'save ""',
                    "appendonly no",
                    f"dir {self._workdir.name}",
                    "loglevel warning",
                    'logfile ""',
                ]
            )
            self._log_path = os.path.join(self._workdir.name, "redis.log")
            with open(self._log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [binary, "-"],
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            self.process.stdin.write(conf.encode())
            self.process.stdin.close()
            address = RedisAddress(self.client_host, port, self.password)
            if self._wait_ready(address):
                self.address = address
                return address
            self.stop()
        raise UserError(f"could not start redis-server on {self.bind}:{port}: {self._last_error}"
                        + (" (choose another --redis-port)" if self.port else ""))

    @property
    def client_host(self) -> str:
        """Where clients connect: the bind address, or this host's name if it binds everywhere."""
        return socket.gethostname() if self.bind in ("0.0.0.0", "::") else self.bind

    def _wait_ready(self, address: RedisAddress) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        self._last_error = "timed out"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(self._log_path, errors="replace") as log:
                    lines = [line.strip() for line in log if line.strip()]
                self._last_error = lines[-1] if lines else f"exit code {self.process.returncode}"
                return False
            try:
                with address.client(socket_connect_timeout=1) as client:
                    if client.ping():
                        return True
            except redis.RedisError:
                # Not up yet, or another server answers on a port ours failed to take:
                # either way, wait for ours to answer or to exit.
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisAddress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def route_address(host: str) -> str:
    """This host's address on the route to `host`: where the other hosts can reach a server here."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))  # a datagram socket's connect sends nothing
        return s.getsockname()[0]


def start_host_servers(comm, first: RedisAddress, n_workers: int,
                       stack: ExitStack) -> tuple[tuple[RedisAddress, ...], tuple[int, ...]]:
    """--redis-per-host, on every rank of the launch (collective): the first rank on each host
    but the manager's starts a private server there, on the route to the manager's (`first`),
    stopped when `stack` closes. Returns those servers (in the order of their hosts' first
    ranks) and each worker's server, an index into (first, *servers).
    """
    from mpi4py import MPI

    hosts = comm.allgather(MPI.Get_processor_name())
    order = list(dict.fromkeys(hosts))  # the manager's host first
    rank = comm.Get_rank()
    started, error = None, None
    if hosts.index(hosts[rank]) == rank and hosts[rank] != hosts[0]:
        try:
            started = stack.enter_context(PrivateRedis(route_address(first.host)))
        except (UserError, OSError) as e:
            error = f"on {hosts[rank]}: {e}"
    # Addresses and passwords travel through MPI, never on a command line.
    gathered = comm.allgather((started, error))
    errors = [e for _, e in gathered if e]
    if errors:
        raise UserError(f"--redis-per-host could not start a server {errors[0]}")
    servers = tuple(address for address, _ in gathered if address is not None)
    # Worker w (shard w - 1) is rank w: its server is its host's.
    return servers, tuple(order.index(hosts[shard + 1]) for shard in range(n_workers))

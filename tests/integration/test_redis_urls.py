"""Runs against a user's own Redis, named by REDIS_URL: an ACL user, a database index, TLS.

    python -m pytest tests/integration/test_redis_urls.py

Each server here is a real redis-server started for the module; the runs are iris, one epoch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from libe_cnn.cli import parse_redis_url
from libe_cnn.redis_server import free_port
from libe_cnn.store import RedisAddress, TensorStore
from tests.conftest import run_cli
from tests.integration.test_cli_errors import one_line_exit_2
from tests.integration.test_mpi import mpirun

ACL = ["user alice on >s3cret ~* &* +@all", "user default off"]


def start_server(args: list[str], log: Path, ready: RedisAddress) -> subprocess.Popen | None:
    """A redis-server that answers `ready`'s PING; None if it exits or never answers."""
    with open(log, "wb") as out:
        process = subprocess.Popen(["redis-server", *args], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with ready.client(socket_connect_timeout=1) as client:
                if client.ping():
                    return process
        except redis.RedisError:
            time.sleep(0.05)
    stop(process)
    return None


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def acl_port(tmp_path_factory):
    """A redis-server whose only user is alice (the default user is off), on a free loopback port."""
    directory = tmp_path_factory.mktemp("acl-redis")
    port = free_port()
    conf = directory / "redis.conf"
    conf.write_text("\n".join([f"port {port}", "bind 127.0.0.1", 'save ""', "appendonly no",
                               f"dir {directory}", *ACL]) + "\n")
    process = start_server([str(conf)], directory / "redis.log", RedisAddress("127.0.0.1", port, "s3cret", "alice"))
    assert process is not None, (directory / "redis.log").read_text()
    yield port
    stop(process)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A redis-server that speaks only TLS, with a certificate for localhost from a throw-away CA:
    (port, the CA's file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates for a TLS server")
    directory = tmp_path_factory.mktemp("tls-redis")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=libe-cnn test CA", cwd=directory)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=directory)
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.cnf", cwd=directory)
    port, ca = free_port(), str(directory / "ca.pem")
    args = ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(directory / "server.pem"),
            "--tls-key-file", str(directory / "server.key"), "--tls-ca-cert-file", ca, "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(directory)]
    log = directory / "redis.log"
    process = start_server(args, log, RedisAddress("localhost", port, tls=True, tls_options={"ssl_ca_certs": ca}))
    if process is None:
        pytest.skip(f"this redis-server does not serve TLS: {log.read_text().strip().splitlines()[-1:]}")
    yield port, ca
    stop(process)


def run_keys_by_database(client: redis.Redis, run_id: str) -> dict[int, list[bytes]]:
    found = {}
    for db in range(16):
        client.select(db)
        keys = list(client.scan_iter(match=f"{run_id}:*"))
        if keys:
            found[db] = keys
    return found


@pytest.mark.parametrize("comms", ["local", "mpi"])
def test_an_acl_user_trains_in_its_database_and_leaves_no_key(tmp_path, acl_port, comms):
    """Under MPI the workers' ranks log in with the address in the manager's plan."""
    url = f"redis://alice:s3cret@127.0.0.1:{acl_port}/3"
    # MONITOR sees every command with the database it ran in: where the run's keys went.
    monitor_log = tmp_path / "monitor.txt"
    with open(monitor_log, "wb") as out:
        monitor = subprocess.Popen(["redis-cli", "-p", str(acl_port), "--user", "alice", "monitor"], stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "REDISCLI_AUTH": "s3cret"})
    run_dir = tmp_path / "run"
    options = ["--dataset", "iris", "--epochs", "1", "--run-dir", str(run_dir)]
    env = {**os.environ, "REDIS_URL": url}
    try:
        result = (run_cli("run_libe_cnn.py", "-n", "2", *options, env=env, timeout=300) if comms == "local"
                  else mpirun(3, *options, env=env))
    finally:
        time.sleep(0.2)  # the last commands reach the monitor
        stop(monitor)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout
    saved = (run_dir / "config.json").read_text()
    config = json.loads(saved)
    assert (config["redis_user"], config["redis_db"], config["redis_password"]) == ("alice", 3, "***")
    assert "s3cret" not in saved + result.stdout + result.stderr + (run_dir / "ensemble.log").read_text()

    run_id = config["run_id"]
    commands = [line for line in monitor_log.read_text(errors="replace").splitlines() if run_id in line]
    assert len(commands) > 20, monitor_log.read_text()[-2000:]
    databases = {re.match(r"\d+\.\d+ \[(\d+) ", line).group(1) for line in commands}
    assert databases == {"3"}
    clients = {re.match(r"\d+\.\d+ \[\d+ ([^\]]+)\]", line).group(1) for line in commands}
    assert len(clients) >= 3  # the generator's and both workers' connections
    with RedisAddress("127.0.0.1", acl_port, "s3cret", "alice").client() as client:
        assert run_keys_by_database(client, run_id) == {}


@pytest.mark.parametrize("credentials, message", [
    ("alice:wrong@", "refused the user or password (user 'alice'"),
    (":s3cret@", "refused the password of its default user"),  # the default user is off
    ("", "asks for a password"),
])
def test_a_refused_login_is_one_line_naming_the_server_and_user(tmp_path, acl_port, run_main, monkeypatch,
                                                                credentials, message):
    monkeypatch.setenv("REDIS_URL", f"redis://{credentials}127.0.0.1:{acl_port}/3")
    result = run_main("--dataset", "iris", "--run-dir", str(tmp_path / "run"))
    one_line_exit_2(result, message)
    assert f"Redis at 127.0.0.1:{acl_port}" in result.stderr
    assert not (tmp_path / "run").exists()


def test_rediss_with_the_servers_ca_carries_tensors(tls_server):
    port, ca = tls_server
    values = parse_redis_url(f"rediss://localhost:{port}/2?ssl_ca_certs={ca}")
    address = RedisAddress(values["redis_host"], values["redis_port"], db=values["redis_db"], tls=values["redis_tls"],
                           tls_options=values["redis_tls_options"])
    store = TensorStore(address, "tls-run")
    array = np.arange(300_000, dtype=np.float32)  # more than one TLS record, and more than one read
    key = store.put(array)
    np.testing.assert_array_equal(store.get(key), array)
    with address.client() as client:
        assert client.exists(key) and client.connection_pool.connection_kwargs["db"] == 2
    store.evict([key])
    store.close()


def test_a_real_run_over_tls(tmp_path, tls_server):
    port, ca = tls_server
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "iris", "--epochs", "1", "--run-dir", str(run_dir),
                     env={**os.environ, "REDIS_URL": f"rediss://localhost:{port}/1?ssl_ca_certs={ca}"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["redis_tls"] and config["redis_tls_options"] == {"ssl_ca_certs": ca}
    address = RedisAddress("localhost", port, db=1, tls=True, tls_options={"ssl_ca_certs": ca})
    with address.client() as client:
        assert run_keys_by_database(client, config["run_id"]) == {}


@pytest.mark.parametrize("query, message", [
    ("", "the TLS handshake with Redis at localhost:{port} failed: self-signed certificate"),  # not the system's CAs
    ("?ssl_ca_certs=/nonexistent/ca.pem", "REDIS_URL's ssl_ca_certs /nonexistent/ca.pem does not exist"),
])
def test_a_failed_tls_handshake_is_one_line(tmp_path, tls_server, run_main, monkeypatch, query, message):
    port, _ = tls_server
    monkeypatch.setenv("REDIS_URL", f"rediss://localhost:{port}/0{query}")
    result = run_main("--dataset", "iris", "--run-dir", str(tmp_path / "run"))
    one_line_exit_2(result, message.format(port=port))
    assert not (tmp_path / "run").exists()

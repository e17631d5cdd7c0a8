"""A Redis URL into the run's config and RedisAddress, and on to the workers (no network).

    python -m pytest tests/unit/test_redis_address.py
"""

import dataclasses
import json
import pickle

import pytest
import redis

from libe_cnn import store
from libe_cnn.cli import config_from_args, parse_redis_url
from libe_cnn.errors import UserError
from libe_cnn.plan import DatasetFiles, RunPlan, plan_from_user
from libe_cnn.store import RedisAddress


@pytest.fixture(autouse=True)
def no_redis_environment(monkeypatch):
    for name in ("REDIS_URL", "REDISCLI_AUTH"):
        monkeypatch.delenv(name, raising=False)


def test_a_url_gives_its_user_password_database_and_tls_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_redis_url("redis://alice:s%40cret@redis.example.org:6390/3") == {
        "redis_host": "redis.example.org", "redis_port": 6390, "redis_user": "alice", "redis_password": "s@cret",
        "redis_db": 3, "redis_tls": False, "redis_tls_options": {}}
    tls = parse_redis_url("rediss://:pw@h?ssl_ca_certs=ca.pem&ssl_cert_reqs=required&ssl_check_hostname=false")
    assert (tls["redis_host"], tls["redis_port"], tls["redis_user"], tls["redis_password"]) == ("h", 6379, None, "pw")
    assert tls["redis_tls"] and tls["redis_db"] == 0
    # A file is made absolute: the run works in its run directory.
    assert tls["redis_tls_options"] == {"ssl_ca_certs": str(tmp_path / "ca.pem"), "ssl_cert_reqs": "required",
                                        "ssl_check_hostname": "false"}
    assert parse_redis_url("redis://h?db=5")["redis_db"] == 5


@pytest.mark.parametrize("url, message", [
    ("http://h:6379", "must look like redis://[USER:PASSWORD@]HOST[:PORT][/DB], or rediss://"),
    ("unix:///run/redis.sock", "got scheme 'unix'"),
    ("redis://:pw@/0", "names no host"),
    ("redis://h:99999", "Port out of range"),
    ("redis://h/three", "its database must be a number"),
    ("redis://h?db=x", "Invalid value for 'db'"),
    ("redis://h?socket_timeout=1", "the run takes no option 'socket_timeout'"),
    ("redis://h?decode_responses=true", "the run takes no option 'decode_responses'"),
    ("rediss://h?ssl_password=x", "ssl_password would be saved with the run"),
    ("rediss://h?ssl_cert_reqs=sometimes", "Invalid SSL Certificate Requirements Flag: sometimes"),
    ("rediss://h?ssl_colour=red", "ssl_colour"),
])
def test_a_bad_url_is_a_user_error_that_never_shows_the_password(url, message):
    with pytest.raises(UserError, match="^REDIS_URL: ") as error:
        parse_redis_url(url.replace("://", "://alice:hunter2@", 1) if "@" not in url else url)
    assert message in str(error.value) and "hunter2" not in str(error.value)


def test_the_url_fills_the_config_and_the_options_given_win(tmp_path, monkeypatch):
    run = ["--run-dir", str(tmp_path / "r")]
    monkeypatch.setenv("REDIS_URL", "redis://alice:s3cret@h:6390/3")
    cfg = config_from_args(run)
    assert (cfg.redis_host, cfg.redis_port, cfg.redis_user, cfg.redis_password, cfg.redis_db) == (
        "h", 6390, "alice", "s3cret", 3)
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["redis_user"], saved["redis_db"]) == ("alice", 3)  # a user may be saved, a password never
    assert "s3cret" not in (tmp_path / "config.json").read_text() and "s3cret" not in repr(cfg)
    given = config_from_args([*run, "--redis-user", "bob", "--redis-password", "pw", "--redis-db", "1"])
    assert (given.redis_host, given.redis_user, given.redis_password, given.redis_db) == ("h", "bob", "pw", 1)
    # No password in the URL: REDISCLI_AUTH, as for --redis-host.
    monkeypatch.setenv("REDIS_URL", "rediss://alice@h/2")
    monkeypatch.setenv("REDISCLI_AUTH", "from-env")
    cfg = config_from_args(run)
    assert (cfg.redis_user, cfg.redis_password, cfg.redis_db, cfg.redis_tls) == ("alice", "from-env", 2, True)


def test_server_options_that_do_not_fit_are_refused(tmp_path, monkeypatch):
    run = ["--run-dir", str(tmp_path / "r")]
    with pytest.raises(UserError, match="apply to an existing server"):  # a private server has no ACL users
        config_from_args([*run, "--redis-user", "alice"])
    with pytest.raises(UserError, match="--redis-db must be 0 or more"):
        config_from_args([*run, "--redis-host", "h", "--redis-db", "-1"])
    monkeypatch.setenv("REDIS_URL", "redis://h?ssl_ca_certs=/ca.pem")
    with pytest.raises(UserError, match="ssl_ca_certs: TLS options need a TLS connection"):
        config_from_args(run)


def test_a_resumed_run_keeps_its_server_and_takes_the_password_from_the_environment(tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    monkeypatch.setenv("REDIS_URL", "rediss://alice:s3cret@h:6390/3?ssl_ca_certs=/ca.pem")
    config_from_args(["--run-dir", str(run_dir)]).save(run_dir / "config.json")
    monkeypatch.delenv("REDIS_URL")

    resumed = config_from_args(["--resume", str(run_dir)])
    assert (resumed.redis_host, resumed.redis_port, resumed.redis_user, resumed.redis_db) == ("h", 6390, "alice", 3)
    assert resumed.redis_tls and resumed.redis_tls_options == {"ssl_ca_certs": "/ca.pem"}
    assert resumed.redis_password is None  # never saved
    monkeypatch.setenv("REDISCLI_AUTH", "s3cret")
    assert config_from_args(["--resume", str(run_dir)]).redis_password == "s3cret"
    monkeypatch.delenv("REDISCLI_AUTH")
    # The URL it was started with gives the password back (and may move it to another server).
    monkeypatch.setenv("REDIS_URL", "rediss://alice:s3cret@h:6390/3?ssl_ca_certs=/ca.pem")
    assert config_from_args(["--resume", str(run_dir)]).redis_password == "s3cret"
    monkeypatch.setenv("REDIS_URL", "redis://bob:pw@other/1")
    moved = config_from_args(["--resume", str(run_dir)])
    assert (moved.redis_host, moved.redis_user, moved.redis_db, moved.redis_tls) == ("other", "bob", 1, False)
    # A server named on the command line replaces all of the saved one.
    private = config_from_args(["--resume", str(run_dir), "--redis-bind", "127.0.0.1"])
    assert (private.redis_host, private.redis_user, private.redis_db, private.redis_tls,
            private.redis_tls_options) == (None, None, 0, False, {})


def test_the_address_reaches_redis_py_as_given():
    address = RedisAddress("h", 6390, "s3cret", "alice", 3, tls=True,
                           tls_options={"ssl_ca_certs": "/ca.pem", "ssl_check_hostname": "false"})
    pool = address.client().connection_pool  # no connection is made until a command
    assert pool.connection_class is redis.SSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["username"], kwargs["password"], kwargs["db"]) == (
        "h", 6390, "alice", "s3cret", 3)
    assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["ssl_check_hostname"] is False  # typed by redis-py
    assert "s3cret" not in repr(address)
    plain = RedisAddress("h", 6379).client().connection_pool
    assert plain.connection_class is redis.Connection and plain.connection_kwargs["db"] == 0


def test_the_plan_carries_the_whole_address_to_the_workers(tmp_path):
    """Workers connect with the manager's address: pickled (MPI) or dumped to dicts (libEnsemble)."""
    address = RedisAddress("h", 6390, "s3cret", "alice", 3, tls=True, tls_options={"ssl_ca_certs": "/ca.pem"})
    cfg = config_from_args(["--redis-host", "h", "--run-dir", str(tmp_path)])
    plan = RunPlan(cfg, DatasetFiles("iris", {"csv": "iris.csv"}), address, 120, 7, 7, more_redis=(address,))
    for arrived in (pickle.loads(pickle.dumps(plan)), dataclasses.asdict(plan)):
        rebuilt = plan_from_user({"plan": arrived})
        assert rebuilt.redis == address and rebuilt.more_redis == (address,)
        assert rebuilt.redis.client().connection_pool.connection_kwargs["username"] == "alice"


def test_redis_py_internals_are_used_when_they_are_as_expected(recwarn):
    if not redis.utils.HIREDIS_AVAILABLE:
        pytest.skip("hiredis is not installed: redis-py's defaults are used, without a warning")
    assert set(store._fast_io()) == {"parser_class", "command_packer"}
    assert not recwarn.list


class PackerOfAnotherRelease:
    def __init__(self, encode) -> None:  # one argument fewer than redis-py 8 takes
        self.encode = encode


@pytest.mark.parametrize("change, error", [
    (lambda m: m.delattr(redis.utils, "HIREDIS_AVAILABLE"), "AttributeError"),
    (lambda m: m.delattr(redis.connection, "_HiredisParser"), "ImportError"),
    (lambda m: m.setattr(redis.connection, "PythonRespSerializer", PackerOfAnotherRelease), "TypeError"),
])
def test_changed_redis_py_internals_fall_back_to_its_defaults_with_a_warning(monkeypatch, change, error):
    if not redis.utils.HIREDIS_AVAILABLE:
        pytest.skip("hiredis is not installed: the internals are not used")
    change(monkeypatch)
    with pytest.warns(UserWarning, match=f"default reply parser and command packer .*{error}") as warned:
        assert store._fast_io() == {}
    assert len(warned) == 1 and "\n" not in str(warned[0].message)

import dataclasses
import json

import pytest

from libe_cnn.config import TrainConfig, config_from_args, parse_redis_url
from libe_cnn.errors import UserError
from libe_cnn.strategies.easgd import elastic_alpha


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_workers": 0}, "-n must be at least 1"),
        ({"batch_size": 0}, "--batch-size"),
        ({"lr": 0.0}, "--lr must be positive"),
        ({"lr": -1.0}, "--lr must be positive"),
        ({"epochs": 0}, "--epochs"),
        ({"dataset": "imagenet"}, "--dataset"),
        ({"optimizer": "lbfgs"}, "--optimizer"),
        ({"reduce": "max"}, "--reduce"),
        ({"device": "tpu"}, "--device"),
        ({"comms": "mpi"}, "--comms mpi needs a Redis every rank can reach"),
        ({"redis_host": "h", "redis_bind": "0.0.0.0"}, "give only one"),
        ({"gen_device": "tpu"}, "--gen-device"),
        ({"redis_port": 0}, "--redis-port"),
        ({"max_steps": 0}, "--max-steps"),
    ],
)
def test_invalid_values_are_user_errors(kwargs, message, tmp_path):
    with pytest.raises(UserError, match=message):
        TrainConfig(run_dir=str(tmp_path), **kwargs)


def test_defaults_resolve_paths_and_run_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig()
    assert cfg.run_id.startswith("lcnn-")
    assert cfg.run_dir.startswith(str(tmp_path / "runs"))
    assert cfg.data_dir is None  # the default search (mnist.data.locate), not one directory
    assert TrainConfig(data_dir="d").data_dir == str(tmp_path / "d")
    assert TrainConfig().run_id != cfg.run_id


def test_password_never_saved(tmp_path):
    cfg = config_from_args(["--redis-host", "h", "--redis-password", "s3cret", "--run-dir", str(tmp_path / "r")])
    assert cfg.redis_password == "s3cret"
    assert "s3cret" not in repr(cfg)
    path = tmp_path / "config.json"
    cfg.save(path)
    assert "s3cret" not in path.read_text()
    assert json.loads(path.read_text())["redis_host"] == "h"


def test_redis_url(monkeypatch, tmp_path):
    monkeypatch.setenv("REDIS_URL", "redis://:pw@example.org:7000/0")
    cfg = config_from_args(["--run-dir", str(tmp_path)])
    assert (cfg.redis_host, cfg.redis_port, cfg.redis_password) == ("example.org", 7000, "pw")
    cfg = config_from_args(["--run-dir", str(tmp_path), "--redis-host", "other"])
    assert (cfg.redis_host, cfg.redis_port, cfg.redis_password) == ("other", 6379, None)


def test_bad_redis_url():
    with pytest.raises(UserError, match="REDIS_URL"):
        parse_redis_url("http://x")


def test_cli_options_reach_the_config(tmp_path):
    cfg = config_from_args(["-n", "3", "--dataset", "fashion-mnist", "--epochs", "2", "--max-steps", "5",
                            "--batch-size", "8", "--lr", "0.1", "--optimizer", "sgd", "--reduce", "mean",
                            "--seed", "9", "--limit-train", "100", "--no-dropout", "--device", "cpu",
                            "--run-dir", str(tmp_path / "r")])
    assert (cfg.n_workers, cfg.dataset, cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.lr, cfg.optimizer,
            cfg.reduce, cfg.seed, cfg.limit_train, cfg.dropout, cfg.device) == (
        3, "fashion-mnist", 2, 5, 8, 0.1, "sgd", "mean", 9, 100, False, "cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "allreduce"}, "--strategy must be one of"),
        ({"sync_period": 2}, "--sync-period does not apply to --strategy sync"),
        ({"strategy": "local", "sync_period": 2}, "--sync-period does not apply to --strategy local"),
        ({"strategy": "async", "reduce": "sum"}, "--reduce does not apply to --strategy async"),
        ({"strategy": "param-avg", "mix_lambda": 0.5}, "--mix-lambda does not apply"),
        ({"strategy": "gossip", "elastic_alpha": 0.1}, "--elastic-alpha does not apply"),
        ({"strategy": "sync", "max_staleness": 1}, "--max-staleness does not apply"),
        ({"strategy": "easgd", "gossip_topology": "ring"}, "--gossip-topology does not apply"),
        ({"strategy": "param-avg", "sync_period": 0}, "--sync-period must be at least 1"),
        ({"strategy": "weighted-param-avg", "mix_lambda": 0.0}, r"--mix-lambda must be in \(0, 1\]"),
        ({"strategy": "weighted-param-avg", "mix_lambda": 1.5}, r"--mix-lambda must be in \(0, 1\]"),
        ({"strategy": "easgd", "elastic_alpha": 0.0}, "--elastic-alpha must be positive"),
        ({"strategy": "easgd", "n_workers": 4, "elastic_alpha": 0.3}, "at most 1/N"),
        ({"strategy": "async", "max_staleness": -1}, "--max-staleness must be at least 0"),
        ({"strategy": "param-avg", "on_nonfinite": "skip"}, "--on-nonfinite skip applies only to sync and async"),
        ({"on_nonfinite": "ignore"}, "--on-nonfinite must be one of"),
    ],
)
def test_strategy_options_are_checked(kwargs, message, tmp_path):
    with pytest.raises(UserError, match=message):
        TrainConfig(run_dir=str(tmp_path), **kwargs)


def test_strategy_defaults_fill_only_what_applies(tmp_path):
    def cfg(**kw):
        return TrainConfig(run_dir=str(tmp_path), **kw)

    assert cfg().reduce == "sum" and cfg().sync_period is None
    assert cfg(strategy="param-avg").sync_period == 4 and cfg(strategy="param-avg").reduce is None
    assert cfg(strategy="weighted-param-avg").mix_lambda == 0.5
    assert cfg(strategy="gossip").gossip_topology == "random"
    assert cfg(strategy="async").max_staleness is None
    # easgd's alpha follows N unless given, also when an MPI launch changes N afterwards.
    easgd = cfg(strategy="easgd", n_workers=2)
    assert elastic_alpha(easgd) == pytest.approx(0.45)
    assert elastic_alpha(dataclasses.replace(easgd, n_workers=3)) == pytest.approx(0.3)
    assert elastic_alpha(cfg(strategy="easgd", elastic_alpha=0.1)) == 0.1
    # A saved config rebuilds to the same config (what the workers do with it).
    saved = cfg(strategy="gossip", sync_period=8).public_dict()
    assert TrainConfig(**saved).public_dict() == saved


def test_redis_choices(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    run = ["--run-dir", str(tmp_path / "r")]
    private = config_from_args(run)
    assert (private.redis_host, private.redis_port, private.redis_bind) == (None, None, None)  # a free port
    bound = config_from_args(["--comms", "mpi", "--redis-bind", "0.0.0.0", "--redis-port", "6380", *run])
    assert (bound.redis_host, bound.redis_port, bound.redis_bind) == (None, 6380, "0.0.0.0")
    assert config_from_args(["--redis-host", "h", *run]).redis_port == 6379
    # A private server asked for explicitly wins over REDIS_URL in the environment.
    monkeypatch.setenv("REDIS_URL", "redis://:pw@example.org:7000/0")
    assert config_from_args(["--redis-bind", "127.0.0.1", *run]).redis_host is None


def test_resume_takes_the_saved_config_and_only_the_options_that_may_change(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    original = config_from_args(["-n", "3", "--lr", "0.01", "--strategy", "easgd", "--redis-host", "h",
                                 "--redis-port", "7000", "--redis-password", "pw", "--run-dir", str(run_dir)])
    original.save(run_dir / "config.json")

    resumed = config_from_args(["--resume", str(run_dir), "--epochs", "3", "--lr", "0.01"])  # lr as it was
    assert resumed.resume and resumed.epochs == 3 and (resumed.n_workers, resumed.lr) == (3, 0.01)
    assert resumed.strategy == "easgd" and resumed.run_dir == str(run_dir)
    assert resumed.run_id != original.run_id  # a new session in the store
    assert (resumed.redis_host, resumed.redis_port, resumed.redis_password) == ("h", 7000, None)  # never saved
    monkeypatch.setenv("REDISCLI_AUTH", "pw")
    assert config_from_args(["--resume", str(run_dir)]).redis_password == "pw"
    moved = config_from_args(["--resume", str(run_dir), "--redis-bind", "127.0.0.1"])
    assert (moved.redis_host, moved.redis_port, moved.redis_bind) == (None, None, "127.0.0.1")

    with pytest.raises(UserError, match="--lr cannot change when resuming"):
        config_from_args(["--resume", str(run_dir), "--lr", "0.1"])
    with pytest.raises(UserError, match="--sync-period cannot change"):
        config_from_args(["--resume", str(run_dir), "--sync-period", "8"])
    (run_dir / "config.json").write_text('{"lr": 0.1, "colour": "red"}')
    with pytest.raises(UserError, match="not a configuration this tool wrote"):
        config_from_args(["--resume", str(run_dir)])


@pytest.mark.parametrize("saved", ["{}", '{"lr": 0.1}', "[]"])
def test_resume_of_a_config_missing_fields_is_one_line(tmp_path, capsys, saved):
    from run_libe_cnn import main

    (tmp_path / "config.json").write_text(saved)
    with pytest.raises(UserError, match="not a configuration this tool wrote"):
        config_from_args(["--resume", str(tmp_path)])
    assert main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a configuration this tool wrote" in err


def test_peer_strategies_need_two_workers(tmp_path):
    with pytest.raises(UserError, match="--strategy gossip exchanges parameters between workers: it needs -n 2"):
        TrainConfig(strategy="gossip", n_workers=1, run_dir=str(tmp_path))
    cfg = TrainConfig(strategy="gossip", n_workers=2, run_dir=str(tmp_path))
    with pytest.raises(UserError, match="needs -n 2"):  # an MPI launch sets N after parsing
        dataclasses.replace(cfg, n_workers=1)
    TrainConfig(strategy="param-avg", n_workers=1, run_dir=str(tmp_path))  # fine alone: averages one model


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_learning_rate_must_be_a_finite_number(tmp_path, value):
    with pytest.raises(UserError, match="--lr must be positive and finite"):
        config_from_args([f"--lr={value}", "--run-dir", str(tmp_path)])

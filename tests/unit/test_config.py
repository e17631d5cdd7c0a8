import json

import pytest

from libe_cnn.config import TrainConfig, config_from_args, parse_redis_url
from libe_cnn.errors import UserError


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
        ({"comms": "mpi"}, "--redis-host"),
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
    assert cfg.data_dir == str(tmp_path / "data")
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

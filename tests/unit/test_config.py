import dataclasses
import json

import pytest

from libe_cnn.cli import config_from_args, parse_redis_url
from libe_cnn.config import TrainConfig
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
        ({"eval_every": -1}, "--eval-every must be at least 0"),
        ({"eval_subset": -1}, "--eval-subset must be at least 0"),
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
        ({"strategy": "async", "wire_dtype": "int8"}, r"--wire-dtype int8 applies to sync and diloco \(sync with --reduce-topology star\)"),
        ({"wire_dtype": "int8", "reduce_topology": "ring"}, r"--reduce-topology ring"),
        ({"wire_dtype": "int8", "parallelism": "pipeline", "n_workers": 2}, r"--parallelism pipeline\)"),
        ({"redis_per_host": True}, "--redis-per-host starts a private server on every host"),
        ({"redis_per_host": True, "comms": "mpi", "redis_bind": "0.0.0.0", "redis_servers": 2}, "no --redis-servers"),
        ({"strategy": "diloco", "outer_lr": 0.0}, r"--outer-lr must be in \(0, 2\]"),
        ({"strategy": "diloco", "outer_momentum": 1.0}, r"--outer-momentum must be in \[0, 1\)"),
        ({"strategy": "param-avg", "outer_lr": 0.5}, r"--outer-lr does not apply to --strategy param-avg \(only to diloco\)"),
        ({"strategy": "easgd", "elastic_alpha": 0.0}, "--elastic-alpha must be positive"),
        ({"strategy": "easgd", "n_workers": 4, "elastic_alpha": 0.3}, "at most 1/N"),
        ({"strategy": "param-avg", "elastic_alpha": 0.1},
         r"--elastic-alpha does not apply to --strategy param-avg \(only to easgd, elastic-gossip\)"),
        ({"strategy": "elastic-gossip", "elastic_alpha": 0.0}, r"--elastic-alpha must be in \(0, 0.5\] for elastic"),
        ({"strategy": "elastic-gossip", "elastic_alpha": 0.6}, r"--elastic-alpha must be in \(0, 0.5\] for elastic"),
        ({"strategy": "elastic-gossip", "mix_lambda": 0.5}, "--mix-lambda does not apply"),
        ({"strategy": "gossip", "agg_prob": 0.0}, r"--agg-prob must be in \(0, 1\]"),
        ({"strategy": "elastic-gossip", "agg_prob": 1.5}, r"--agg-prob must be in \(0, 1\]"),
        ({"strategy": "elastic-gossip", "agg_prob": float("nan")}, r"--agg-prob must be in \(0, 1\]"),
        ({"strategy": "easgd", "agg_prob": 0.5}, r"--agg-prob does not apply to --strategy easgd \(only to gossip, "),
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
    assert cfg(strategy="gossip").agg_prob == 1.0 and cfg(strategy="gossip").elastic_alpha is None
    elastic_gossip = cfg(strategy="elastic-gossip", n_workers=4)
    assert (elastic_gossip.elastic_alpha, elastic_gossip.agg_prob, elastic_gossip.gossip_topology,
            elastic_gossip.sync_period) == (0.25, 1.0, "random", 4)
    assert cfg(strategy="easgd").agg_prob is None
    # Each strategy checks --elastic-alpha its own way: 0.5 is gossip's average for a pair, but
    # more than easgd's 1/N with 4 workers.
    assert cfg(strategy="elastic-gossip", n_workers=4, elastic_alpha=0.5).elastic_alpha == 0.5
    with pytest.raises(UserError, match="at most 1/N"):
        cfg(strategy="easgd", n_workers=4, elastic_alpha=0.5)
    # A saved config rebuilds to the same config (what the workers do with it).
    for saved in (cfg(strategy="gossip", sync_period=8).public_dict(),
                  cfg(strategy="elastic-gossip", agg_prob=0.5).public_dict()):
        assert TrainConfig(**saved).public_dict() == saved


def test_versions_of_one_option_parse_alike_and_each_has_its_help(tmp_path):
    """Strategies may share a field (easgd's and elastic-gossip's --elastic-alpha): the command line
    parses it once, and --help gives each version's range and default."""
    from libe_cnn import strategies
    from libe_cnn.cli import build_parser

    for option in strategies.all_options().values():
        versions = strategies.option_versions(option)
        assert {(o.name, o.flag, o.type, o.choices, o.metavar) for o in versions} == \
            {(option.name, option.flag, option.type, option.choices, option.metavar)}
        assert [name for names in versions.values() for name in names] == strategies.takers(option)
    alpha = strategies.all_options()["elastic_alpha"]
    assert [tuple(names) for names in strategies.option_versions(alpha).values()] == [("easgd",), ("elastic-gossip",)]
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert helps["elastic_alpha"] == ("easgd: moving rate of workers and center (at most 1/N) (default: 0.9/N); "
                                      "elastic-gossip: how far each of a pair moves toward the other "
                                      "(at most 0.5; 0.5 is gossip's average) (default: 0.25)")
    assert helps["agg_prob"].startswith("gossip, elastic-gossip: ") and helps["agg_prob"].endswith("(default: 1.0)")
    assert helps["sync_period"].startswith("param-avg, weighted-param-avg, easgd, gossip, elastic-gossip: ")
    assert helps["sync_period"].endswith("; diloco: inner steps between outer steps (default: 32)")
    cfg = config_from_args(["--strategy", "elastic-gossip", "--elastic-alpha", "0.4", "--agg-prob", "0.5",
                            "--run-dir", str(tmp_path / "r")])
    assert (cfg.elastic_alpha, cfg.agg_prob) == (0.4, 0.5)


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
    with pytest.raises(UserError, match="--agg-prob cannot change"):  # which pairs exchange: the math
        config_from_args(["--resume", str(run_dir), "--agg-prob", "0.5"])
    (run_dir / "config.json").write_text('{"lr": 0.1, "colour": "red"}')
    with pytest.raises(UserError, match="not a configuration this tool wrote"):
        config_from_args(["--resume", str(run_dir)])


def test_a_run_saved_before_later_options_existed_resumes_with_their_defaults(tmp_path, monkeypatch):
    from libe_cnn.cli import ADDED_FIELDS

    monkeypatch.delenv("REDIS_URL", raising=False)
    saved = config_from_args(["-n", "4", "--run-dir", str(tmp_path)]).public_dict()
    for name in ADDED_FIELDS:
        del saved[name]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    resumed = config_from_args(["--resume", str(tmp_path)])
    assert (resumed.bucket_mb, resumed.reduce_topology, resumed.redis_servers) == (1.0, None, 1)
    saved.pop("n_workers")  # a field every saved run has
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="fields missing or unknown: n_workers"):
        config_from_args(["--resume", str(tmp_path)])


def test_redis_servers_and_reduce_topology_are_checked(tmp_path):
    with pytest.raises(UserError, match="--redis-servers must be at least 1"):
        TrainConfig(redis_servers=0, run_dir=str(tmp_path))
    with pytest.raises(UserError, match="--redis-servers starts private servers and --redis-host names one"):
        TrainConfig(redis_servers=2, redis_host="h", run_dir=str(tmp_path))
    with pytest.raises(UserError, match="--redis-port fixes the port of one private server"):
        TrainConfig(redis_servers=2, redis_port=7000, run_dir=str(tmp_path))
    with pytest.raises(UserError, match="--reduce-topology does not apply"):
        TrainConfig(strategy="async", reduce_topology="ring", run_dir=str(tmp_path))
    with pytest.raises(UserError, match="--reduce-topology must be one of star, ring"):
        TrainConfig(reduce_topology="tree", run_dir=str(tmp_path))


@pytest.mark.parametrize("comms, n, topology", [("local", 2, "star"), ("local", 16, "star"), ("mpi", 3, "star"),
                                                ("mpi", 4, "ring"), ("mpi", 64, "ring")])
def test_sync_chooses_its_topology_by_comms_and_n_unless_told(tmp_path, comms, n, topology):
    from libe_cnn.strategies.sync import reduce_topology

    where = {"comms": comms, "redis_bind": "0.0.0.0"} if comms == "mpi" else {}
    assert reduce_topology(TrainConfig(n_workers=n, run_dir=str(tmp_path), **where)) == topology
    told = "star" if topology == "ring" else "ring"
    assert reduce_topology(TrainConfig(n_workers=n, reduce_topology=told, run_dir=str(tmp_path), **where)) == told
    # int8's rounding is carried over on the generator's side of star.
    assert reduce_topology(TrainConfig(n_workers=n, wire_dtype="int8", run_dir=str(tmp_path), **where)) == "star"


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
    with pytest.raises(UserError, match="--strategy elastic-gossip exchanges parameters between workers"):
        TrainConfig(strategy="elastic-gossip", n_workers=1, run_dir=str(tmp_path))
    cfg = TrainConfig(strategy="gossip", n_workers=2, run_dir=str(tmp_path))
    with pytest.raises(UserError, match="needs -n 2"):  # an MPI launch sets N after parsing
        dataclasses.replace(cfg, n_workers=1)
    TrainConfig(strategy="param-avg", n_workers=1, run_dir=str(tmp_path))  # fine alone: averages one model


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_learning_rate_must_be_a_finite_number(tmp_path, value):
    with pytest.raises(UserError, match="--lr must be positive and finite"):
        config_from_args([f"--lr={value}", "--run-dir", str(tmp_path)])


def test_tensorboard_without_its_package_is_a_user_error_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'libe-cnn\[tensorboard\]'"):
        TrainConfig(run_dir=str(tmp_path), tensorboard=str(tmp_path / "board"))
    assert TrainConfig(run_dir=str(tmp_path)).tensorboard is None

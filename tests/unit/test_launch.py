"""What the launcher prints: the --print-launch lines, the run's schedule, the oversubscription warning."""

import shlex
from pathlib import Path

from libe_cnn.cli import config_from_args
from libe_cnn.config import TrainConfig
from libe_cnn.plan import DatasetFiles, RunPlan, steps_per_epoch
from run_libe_cnn import launch_lines, main, oversubscription_warning, schedule_line


def launched_args(line: str) -> list[str]:
    """The run_libe_cnn.py options of a printed launch line."""
    words = shlex.split(line)
    [script] = [i for i, word in enumerate(words) if word.endswith("run_libe_cnn.py")]
    return words[script + 1 :]


def test_launch_lines_run_the_same_options_on_n_plus_one_ranks(tmp_path):
    argv = ["-n", "7", "--dataset", "fashion-mnist", "--epochs=3", "--strategy", "gossip", "--run-dir", str(tmp_path)]
    text = launch_lines(config_from_args(argv), argv)
    mpiexec = next(line for line in text.splitlines() if line.startswith("mpiexec"))
    srun = next(line for line in text.splitlines() if line.startswith("srun"))
    assert mpiexec.split()[:3] == ["mpiexec", "-n", "8"] and "--ntasks 8" in srun and "--nodes 2" in srun
    assert "6380" in text and "open" in text
    for line in (mpiexec, srun):
        cfg = config_from_args(launched_args(line))
        assert (cfg.comms, cfg.redis_bind, cfg.redis_port) == ("mpi", "0.0.0.0", 6380)
        assert (cfg.dataset, cfg.epochs, cfg.strategy, cfg.run_dir) == ("fashion-mnist", 3, "gossip", str(tmp_path))
        assert "-n" not in launched_args(line)  # the launch decides N


def test_launch_lines_keep_an_external_redis(tmp_path):
    argv = ["--redis-host", "redis.example.org", "--redis-port", "7000", "--run-dir", str(tmp_path)]
    text = launch_lines(config_from_args(argv), argv)
    cfg = config_from_args(launched_args(text.splitlines()[-1]))
    assert (cfg.redis_host, cfg.redis_port, cfg.redis_bind) == ("redis.example.org", 7000, None)


def test_print_launch_prints_and_runs_nothing(tmp_path, capsys):
    assert main(["-n", "3", "--print-launch", "--run-dir", str(tmp_path / "r")]) == 0
    assert "mpiexec -n 4" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_print_launch_checks_the_options_first(capsys):
    assert main(["--lr", "0", "--print-launch"]) == 2
    assert "--lr must be positive" in capsys.readouterr().err


def test_launch_lines_use_absolute_paths_and_spread_ranks_over_both_nodes(tmp_path):
    argv = ["-n", "3", "--run-dir", str(tmp_path / "my runs")]
    lines = launch_lines(config_from_args(argv), argv).splitlines()
    openmpi, mpich = (next(line for line in lines if line.startswith("mpiexec") and flag in line)
                      for flag in ("--map-by node", "-ppn 2"))
    for line in (openmpi, mpich):
        words = shlex.split(line)
        script = next(w for w in words if w.endswith("run_libe_cnn.py"))
        assert Path(script).is_absolute() and Path(script).is_file()
        assert Path(words[words.index(script) - 1]).is_absolute()  # the interpreter
        assert config_from_args(launched_args(line)).run_dir == str(tmp_path / "my runs")  # quoted


def test_more_workers_than_cores_warns_once(monkeypatch, tmp_path):
    import libe_cnn.runtime

    monkeypatch.setattr(libe_cnn.runtime, "available_cores", lambda: 2)
    assert oversubscription_warning(TrainConfig(n_workers=2, run_dir=str(tmp_path))) is None
    warning = oversubscription_warning(TrainConfig(n_workers=12, run_dir=str(tmp_path)))
    assert "12 workers on 2 cores" in warning and "-n 2" in warning


def test_the_schedule_says_which_samples_are_used_and_why_not_the_rest(tmp_path):
    def line(n, batch, n_train, strategy="sync"):
        cfg = TrainConfig(n_workers=n, batch_size=batch, strategy=strategy, run_dir=str(tmp_path))
        per_epoch = steps_per_epoch(n_train, n, batch)
        return schedule_line(RunPlan(cfg, DatasetFiles("mnist", {}), None, n_train, per_epoch, per_epoch))

    # 7 shards of 585 (5 left over), 9 batches of 64 from each (9 left over per shard).
    assert line(7, 64, 4100) == ("9 steps on 4032 mnist samples per epoch (68 of 4100 left out each epoch: "
                                 "5 to make 7 equal shards, 63 in incomplete batches)")
    assert line(2, 50, 1000) == "10 steps on 1000 mnist samples per epoch"
    assert line(2, 50, 1000, "async").startswith("20 gradients (10 per worker) on 1000")


def test_launch_lines_as_root_tell_open_mpi_to_allow_it(tmp_path):
    argv = ["-n", "3", "--run-dir", str(tmp_path)]
    for root in (False, True):
        lines = launch_lines(config_from_args(argv), argv, root=root).splitlines()
        openmpi = next(line for line in lines if "--map-by node" in line)
        mpich = next(line for line in lines if "-ppn" in line)
        assert ("--allow-run-as-root" in openmpi) == root and "--allow-run-as-root" not in mpich


def test_print_launch_warns_when_mpi4py_is_missing(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mpi4py" else find_spec(name, *a))
    assert main(["-n", "2", "--print-launch", "--run-dir", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: mpi4py is not installed") and "make setup-mpi" in err

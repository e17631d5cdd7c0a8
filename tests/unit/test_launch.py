"""--print-launch: the two-node launch lines for the options given."""

import shlex

from libe_cnn.config import config_from_args
from run_libe_cnn import launch_lines, main


def launched_args(line: str) -> list[str]:
    """The run_libe_cnn.py options of a printed launch line."""
    words = shlex.split(line)
    return words[words.index("run_libe_cnn.py") + 1 :]


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

"""Bad input ends in one line on stderr and exit code 2, with nothing written.

Every check here ends before any worker starts, so most run run_libe_cnn's main() in this
process (the run_main fixture); two run as real subprocesses, to show that a user's terminal
sees that one line and nothing else (no warning, no traceback, from any import).
"""


import pytest
import torch

from tests.conftest import run_cli


def one_line_exit_2(result, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize("args, message", [
    (["--strategy", "allreduce"], "invalid choice: 'allreduce'"),  # the parser's own errors
    (["--dataset", "fashion-mnist", "--limit-train", "10", "-n", "2"], "fewer than --batch-size"),  # after torch
])
def test_a_terminal_sees_one_line(tmp_path, args, message):
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", *args, "--run-dir", str(run_dir), timeout=60)
    one_line_exit_2(result, message)
    assert result.stdout == "" and not run_dir.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "0"], "-n must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--lr", "0"], "--lr must be positive"),
        (["--lr", "inf"], "--lr must be positive and finite"),
        (["--limit-test", "0"], "--limit-test must be at least 1 (got 0)"),
        (["--max-steps", "0"], "--max-steps must be at least 1 (got 0)"),
        (["--limit-train", "0"], "--limit-train must be at least 1 (got 0)"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1 (got 0)"),
        (["--eval-every", "-1"], "--eval-every must be at least 0 (got -1)"),
        (["--resume", "runs/no-such-run"], "cannot resume runs/no-such-run: no such directory"),
        (["--strategy", "gossip", "-n", "1"], "it needs -n 2 or more"),
        (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:K"),
        (["--dataset", "fashion-mnist", "--limit-train", "10", "-n", "2"], "fewer than --batch-size"),
        (["--dataset", "fashion-mnist", "--redis-host", "127.0.0.1", "--redis-port", "1"],
         "cannot reach Redis at 127.0.0.1:1: start it (rediss:// if it takes TLS only), or omit --redis-host"),
        (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["--strategy", "allreduce"], "invalid choice: 'allreduce'"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--sync-period", "4"], "--sync-period does not apply to --strategy sync"),
        (["--strategy", "async", "--reduce", "mean"], "--reduce does not apply to --strategy async"),
        (["--strategy", "param-avg", "--mix-lambda", "0.3"], "--mix-lambda does not apply"),
        (["--strategy", "gossip", "--elastic-alpha", "0.1"],
         "--elastic-alpha does not apply to --strategy gossip (only to easgd, elastic-gossip)"),
        (["--strategy", "elastic-gossip", "--elastic-alpha", "0.6"], "--elastic-alpha must be in (0, 0.5]"),
        (["--strategy", "elastic-gossip", "-n", "1"], "it needs -n 2 or more"),
        (["--strategy", "easgd", "--agg-prob", "0.5"], "--agg-prob does not apply to --strategy easgd"),
        (["--strategy", "gossip", "--agg-prob", "0"], "--agg-prob must be in (0, 1]"),
        (["--strategy", "easgd", "--max-staleness", "1"], "--max-staleness does not apply"),
        (["--strategy", "local", "--sync-period", "2"], "--sync-period does not apply to --strategy local"),
        (["--strategy", "easgd", "-n", "4", "--elastic-alpha", "0.5"], "at most 1/N"),
        (["--parallelism", "pipeline", "-n", "3"], "-n 3 is not a multiple of --stages 2"),
        (["--parallelism", "pipeline", "--microbatches", "65"], "--microbatches 65 is more than --batch-size 64"),
        (["--parallelism", "pipeline", "-n", "5", "--stages", "5", "--dataset", "fashion-mnist"],
         "--stages 5 is more than the 4 layers of --model cnn for fashion-mnist"),
        (["--parallelism", "pipeline", "--split", "7", "--dataset", "fashion-mnist"],
         "give one layer number from 1 to 3"),
        (["--stages", "2"], "--stages applies only to --parallelism pipeline"),
        (["--model", "resnet18", "--dataset", "iris"], "--model resnet18 takes images"),
    ],
)
def test_bad_input_is_one_line(tmp_path, run_main, args, message):
    run_dir = tmp_path / "run"
    one_line_exit_2(run_main(*args, "--run-dir", str(run_dir)), message)
    assert not run_dir.exists()


def test_missing_dataset_names_what_to_do(tmp_path, run_main, offline):
    # MNIST is not shipped; where it cannot be downloaded the error says how to provide it.
    result = run_main("--dataset", "mnist", "--data-dir", str(tmp_path / "nodata"), "--run-dir", str(tmp_path / "run"))
    one_line_exit_2(result, "mnist not found in")
    assert "IDX files" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_default_dataset_missing_offline_names_the_ones_this_machine_has(tmp_path, fashion_files, run_main,
                                                                             offline, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here: the bare command looks where a new user's would
    result = run_main("-n", "2", "--run-dir", str(tmp_path / "run"))
    one_line_exit_2(result, "mnist not found in")
    assert "this machine already has fashion-mnist, iris: try --dataset fashion-mnist" in result.stderr
    assert not (tmp_path / "run").exists()


def test_redis_url_with_no_server_says_to_unset_it(tmp_path, fashion_files, run_main, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    result = run_main("--dataset", "fashion-mnist", "--run-dir", str(tmp_path / "run"))
    one_line_exit_2(result, "cannot reach Redis at 127.0.0.1:1: start it (rediss:// if it takes TLS only), "
                            "or unset REDIS_URL to use a private server")
    assert "--redis-host" not in result.stderr


def test_existing_run_dir_is_not_overwritten(tmp_path, run_main):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.pt").write_bytes(b"precious")
    one_line_exit_2(run_main("--dataset", "fashion-mnist", "--run-dir", str(run_dir)), "already exists")
    assert (run_dir / "model.pt").read_bytes() == b"precious"


@pytest.mark.parametrize("damage, message", [("truncate", "truncated or corrupt"), ("magic", "bad magic")])
def test_corrupt_data_file_is_caught_before_anything_starts(tiny_dataset, tmp_path, run_main, damage, message):
    images = tiny_dataset / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    data = images.read_bytes()
    images.write_bytes(data[:-100] if damage == "truncate" else b"\x07\x07" + data[2:])
    run_dir = tmp_path / "run"
    result = run_main("--dataset", "fashion-mnist", "--data-dir", str(tiny_dataset), "--batch-size", "10",
                      "--run-dir", str(run_dir))
    one_line_exit_2(result, message)
    assert "t10k-images" in result.stderr
    assert not run_dir.exists()


def test_missing_redis_server_says_how_to_install_it(tmp_path, run_main, monkeypatch):
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    monkeypatch.setenv("PATH", str(empty_path))
    result = run_main("--dataset", "fashion-mnist", "--run-dir", str(tmp_path / "run"))
    one_line_exit_2(result, "redis-server not found")
    assert "apt-get install redis-server" in result.stderr and "brew" in result.stderr and "pixi" in result.stderr
    assert not (tmp_path / "run").exists()


def test_wrong_redis_password(tmp_path, redis_address, fashion_files, run_main, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://:wrong@{redis_address.host}:{redis_address.port}/0")
    one_line_exit_2(run_main("--dataset", "fashion-mnist", "--run-dir", str(tmp_path / "run")), "refused the password")
    assert not (tmp_path / "run").exists()


def test_private_redis_port_in_use(tmp_path, redis_address, fashion_files, run_main):
    result = run_main("--dataset", "fashion-mnist", "--redis-port", str(redis_address.port),
                      "--run-dir", str(tmp_path / "run"))
    one_line_exit_2(result, "choose another --redis-port")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: asking for one is no error")
@pytest.mark.parametrize("flag", ["--device", "--gen-device"])
def test_a_gpu_that_is_not_there_is_refused_before_start(tmp_path, run_main, flag):
    result = run_main("--dataset", "fashion-mnist", flag, "cuda", "--run-dir", str(tmp_path / "run"))
    one_line_exit_2(result, f"{flag} cuda: no GPU is visible on this node")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where, reason", [("/proc/libe-cnn-run", "No such file or directory"),
                                           ("file/run", "Not a directory")])
def test_a_run_directory_that_cannot_be_created_is_one_line(tmp_path, fashion_files, run_main, where, reason):
    (tmp_path / "file").write_text("a regular file")
    run_dir = where if where.startswith("/") else str(tmp_path / where)
    one_line_exit_2(run_main("--dataset", "fashion-mnist", "--run-dir", run_dir),
                    f"cannot create run directory {run_dir}: {reason}")

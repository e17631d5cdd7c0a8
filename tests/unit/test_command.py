"""The `libe-cnn` command (libe_cnn/__main__.py): each subcommand reaches its code, bad input is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import run_libe_cnn
from libe_cnn.__main__ import main
from mnist import data
from tests.conftest import call_main


@pytest.fixture
def command(capsys):
    return lambda *args: call_main(main, args, capsys)


def test_train_hands_every_later_argument_to_the_trainer(command, monkeypatch):
    seen = []
    monkeypatch.setattr(run_libe_cnn, "main", lambda argv: seen.append(argv) or 7)
    # Options the command line itself has (-h, -o) are the trainer's after `train`.
    result = command("train", "-n", "3", "--dataset", "iris", "-h", "-o", "x")
    assert result.returncode == 7 and seen == [["-n", "3", "--dataset", "iris", "-h", "-o", "x"]]


def test_train_is_the_trainer_itself(command):
    result = command("train", "--help")
    assert result.returncode == 0 and "--nworkers" in result.stdout and "--redis-host" in result.stdout
    result = command("train", "-n", "0", "--dataset", "iris")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_plot_reaches_the_plotter(command, tmp_path, monkeypatch):
    import libe_cnn.plots

    seen = []
    monkeypatch.setattr(libe_cnn.plots, "write_curves", lambda runs, out: seen.append((runs, out)))
    result = command("plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "ab.png"))
    assert result.returncode == 0 and seen == [([tmp_path / "a", tmp_path / "b"], tmp_path / "ab.png")]
    result = command("plot", str(tmp_path / "a"), str(tmp_path / "b"))  # several runs need -o
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and len(seen) == 1


def test_fetch_prints_where_a_run_reads_the_data(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here
    result = command("fetch", "iris")
    assert (result.returncode, result.stdout) == (0, f"iris: {data.SHIPPED_IRIS.parent}\n")
    raw = tmp_path / "mine" / "FashionMNIST" / "raw"
    result = command("fetch", "fashion-mnist", "--data-dir", str(tmp_path / "mine"), "--no-download")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: fashion-mnist not found in {raw} ")
    assert not (tmp_path / "mine").exists()  # only looked


def test_fetch_downloads_what_is_missing(command, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(data, "locate", lambda name, where, download: seen.append((name, where, download))
                        or data.DatasetFiles(name, {"x": str(tmp_path / "got" / "x")}))
    result = command("fetch", "cifar10", "--data-dir", str(tmp_path))
    assert result.returncode == 0 and seen == [("cifar10", str(tmp_path), True)]
    assert result.stdout == f"cifar10: {tmp_path / 'got'}\n"


@pytest.mark.parametrize("args", [[], ["bogus"], ["fetch", "imagenet"], ["fetch"]], ids=repr)
def test_bad_command_lines_are_one_line(command, args):
    result = command(*args)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "(see libe-cnn" in result.stderr


def test_the_installed_command_runs():
    """The console script pip made from [project.scripts]: after pip install -e ., beside the interpreter."""
    installed = Path(sys.executable).with_name("libe-cnn")
    assert installed.is_file(), f"{installed} is missing: pip install -e . installs it"
    result = subprocess.run([str(installed), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: libe-cnn ") and all(c in result.stdout for c in ("train", "plot", "fetch"))

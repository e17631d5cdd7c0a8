"""The other datasets through the whole pipeline: Iris (the hello world) and CIFAR-10."""

from __future__ import annotations

import json

import numpy as np
import torch

from mnist.data import SYSTEM_DIRS
from mnist.model import build_model
from tests.conftest import run_cli, write_cifar10, write_idx


def test_iris_trains_to_90_percent_in_seconds(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "iris", "--run-dir", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # 120 training flowers, 2 workers x 8 per step: 7 steps an epoch, 50 epochs by default.
    assert summary["steps"] == 350 and summary["test_accuracy"] >= 0.9, summary
    build_model(0, dataset="iris").load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))


def test_iris_standalone_reaches_the_same_accuracy():
    result = run_cli("mnist/nn.py", "--dataset", "iris", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 90, result.stdout


def test_cifar10_runs_its_own_cnn_through_the_ensemble(tmp_path):
    data_dir = write_cifar10(tmp_path / "data", per_batch=40, test=20)
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "cifar10", "--data-dir", str(data_dir),
                     "--batch-size", "16", "--max-steps", "3", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 3 * 2 * 16
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state["features.0.weight"].shape == (32, 3, 3, 3)  # colour input
    assert np.isfinite(summary["test_loss"])


# The three checks below end before anything starts: run_libe_cnn's main() in this process.

def test_truncated_cifar10_file_is_one_line_before_start(tmp_path, run_main):
    data_dir = write_cifar10(tmp_path / "data", per_batch=10, test=10)
    batch = data_dir / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-5])
    result = run_main("--dataset", "cifar10", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run"))
    errors = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(errors) == 1 and "data_batch_3.bin is truncated" in errors[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_label_is_one_line_before_start(tiny_dataset, tmp_path, run_main):
    # The reported case: one label byte set to 250 used to fail only at the step that drew it.
    labels = np.arange(100) % 10
    labels[17] = 250
    write_idx(tiny_dataset / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte", labels, gz=True)
    result = run_main("-n", "2", "--dataset", "fashion-mnist", "--data-dir", str(tiny_dataset),
                      "--batch-size", "16", "--run-dir", str(tmp_path / "run"))
    errors = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "train-labels-idx1-ubyte.gz is corrupt: label 250 at position 17 is not a class 0-9" in errors[0]
    assert not (tmp_path / "run").exists()


def test_explicit_data_dir_is_the_only_place_looked(tmp_path, run_main, offline):
    # It used to train on the system copy while config.json said /nonexistent.
    data_dir = tmp_path / "nonexistent"
    result = run_main("-n", "2", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--max-steps", "1",
                      "--run-dir", str(tmp_path / "run"))
    errors = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert f"fashion-mnist not found in {data_dir}/FashionMNIST/raw" in errors[0]
    assert "could not be downloaded (<urlopen error" in errors[0]  # the reason, not an empty one
    if any(d.is_dir() for d in SYSTEM_DIRS["fashion-mnist"]):
        assert "leave out --data-dir to use it" in errors[0]
    assert not data_dir.exists()  # the failed download left no empty folders
    assert not (tmp_path / "run").exists()

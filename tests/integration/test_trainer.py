"""The whole trainer through real processes: libEnsemble workers, redis-server, real data."""

from __future__ import annotations

import json
import os

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F

from mnist.model import make_optimizer
from libe_cnn.store import run_keys
from mnist.data import batch_positions, load_shard
from mnist.model import build_model
from tests.conftest import run_cli


def redis_servers() -> set[int]:
    """redis-servers that no Python process owns any more: what a run that leaks one leaves.

    A private server is its run's child; one whose run is gone has been re-parented away from
    any Python process. Servers of runs still going (or of this test session) do not count,
    so the check holds on a machine running other jobs too.
    """
    def owned(p: psutil.Process) -> bool:
        return any("python" in (parent.name() or "") for parent in p.parents())

    servers = []
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] == "redis-server" and not owned(p):
                servers.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return set(servers)


def redis_env(address) -> dict:
    return {**os.environ, "REDIS_URL": f"redis://:{address.password}@{address.host}:{address.port}/0"}


def test_end_to_end_with_private_redis(tmp_path, fashion_files):
    before = redis_servers()
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "fashion-mnist", "--limit-train", "8192",
                     "--max-steps", "40", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout

    expected = {"config.json", "metrics.jsonl", "model.pt", "checkpoint.pt", "summary.json", "curves.png",
                "curves.json", "ensemble.log", "libE_stats.txt"}
    names = {p.name for p in run_dir.iterdir()}
    assert expected <= names, names
    assert any(n.startswith("libE_history") and n.endswith(".npy") for n in names)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["samples"] == 40 * 2 * 64
    assert summary["n_workers"] == 2 and summary["dataset"] == "fashion-mnist"
    assert summary["test_accuracy"] > 0.5  # chance is 0.1
    for field in ("wall_s", "samples_per_s", "test_loss"):
        assert summary[field] > 0

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert all({"step", "epoch", "loss", "samples", "wall_s"} <= r.keys() for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert evals and 0 <= evals[-1]["test_accuracy"] <= 1 and evals[-1]["step"] == 40
    # The learning curves: a real PNG, with the data it shows beside it.
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [curves] = json.loads((run_dir / "curves.json").read_text())["runs"]
    assert curves["train"]["step"] == list(range(1, 41))
    assert curves["eval"]["test_accuracy"][-1] == evals[-1]["test_accuracy"]

    state = torch.load(run_dir / "model.pt", weights_only=True)
    model = build_model(0)
    model.load_state_dict(state)  # a complete state_dict of the one model definition

    config = json.loads((run_dir / "config.json").read_text())
    assert config["n_workers"] == 2 and config["redis_password"] is None
    # The private server is gone with the run.
    assert redis_servers() <= before


def test_external_redis_is_left_running_and_clean(tmp_path, redis_address, fashion_files):
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "fashion-mnist", "--limit-train", "2048",
                     "--max-steps", "5", "--run-dir", str(run_dir), env=redis_env(redis_address))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["redis_host"] == redis_address.host
    assert redis_address.password not in (run_dir / "config.json").read_text()
    assert redis_address.password not in (run_dir / "ensemble.log").read_text()
    assert run_keys(redis_address, config["run_id"]) == []
    with redis_address.client() as client:
        assert client.ping()


def single_process_steps(files, seed: int, n_train: int, n_workers: int, batch: int, steps: int, lr: float):
    """The reference: one process, the same initial weights, each step on the union batch."""
    model = build_model(seed, dropout=False).train()
    optimizer = make_optimizer("sgd", model.parameters(), lr)
    shards = [load_shard(files, n_train, n_workers, s, seed) for s in range(n_workers)]
    for step in range(steps):
        xs, ys = [], []
        for shard, (x, y) in enumerate(shards):
            pos = torch.from_numpy(batch_positions(len(y), seed, shard, step, len(y) // batch, batch))
            xs.append(x[pos])
            ys.append(y[pos])
        optimizer.zero_grad()
        F.nll_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("steps", [3])  # one step too: tests/loops
def test_parity_with_single_process_on_the_union_batch(tmp_path, fashion_files, steps):
    seed, n_train, batch, lr = 3, 1024, 16, 0.05
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "fashion-mnist", "--limit-train", str(n_train),
                     "--batch-size", str(batch), "--max-steps", str(steps), "--reduce", "mean", "--no-dropout",
                     "--optimizer", "sgd", "--lr", str(lr), "--seed", str(seed), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    ensemble = torch.load(run_dir / "model.pt", weights_only=True)
    reference = single_process_steps(fashion_files, seed, n_train, 2, batch, steps, lr)
    initial = build_model(seed, dropout=False).state_dict()
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        np.testing.assert_allclose(ensemble[name].numpy(), value.numpy(), atol=1e-5, rtol=0, err_msg=name)


def test_standalone_dry_run():
    result = run_cli("mnist/nn.py", "--dry-run", "--dataset", "fashion-mnist")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: 1 steps")


def test_ctrl_c_stops_cleanly_and_keeps_the_model(tmp_path, fashion_files):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    before = redis_servers()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "run_libe_cnn.py", "-n", "2", "--dataset", "fashion-mnist", "--max-steps", "2000",
         "--run-dir", str(run_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().endswith("interrupted")
    assert (run_dir / "model.pt").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["completed"] and summary["steps"] >= 5
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert redis_servers() <= before


@pytest.mark.parametrize("wire", ["bfloat16"])  # float16 too: tests/loops
def test_16_bit_wire_trains_and_halves_the_traffic(tmp_path, fashion_files, wire):
    runs = {}
    for dtype in ("float32", wire):
        run_dir = tmp_path / dtype
        result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "fashion-mnist", "--limit-train", "4096",
                         "--max-steps", "20", "--wire-dtype", dtype, "--run-dir", str(run_dir))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[dtype] = json.loads((run_dir / "summary.json").read_text())
    assert runs[wire]["wire_dtype"] == wire and runs[wire]["test_accuracy"] > 0.5
    ratio = runs[wire]["store_bytes_per_step"] / runs["float32"]["store_bytes_per_step"]
    assert 0.45 < ratio < 0.55, ratio


def test_no_thread_settings_needed(tmp_path, fashion_files):
    """Default OpenMP settings: no fork-after-threads deadlock (workers are spawned, not forked)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "fashion-mnist", "--limit-train", "2048",
                     "--max-steps", "3", "--run-dir", str(run_dir), env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3

"""The whole trainer through real processes: libEnsemble workers, redis-server, real data."""

from __future__ import annotations

import json
import os

import psutil
import torch
import torch.nn.functional as F

from mnist.data import batch_positions, load_shard
from mnist.model import build_model, make_optimizer
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
    # Default OpenMP settings: no fork-after-threads deadlock (workers are spawned, not forked).
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    result = run_cli("run_libe_cnn.py", "-n", "2", "--dataset", "fashion-mnist", "--limit-train", "8192",
                     "--max-steps", "40", "--limit-test", "2000", "--run-dir", str(run_dir), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout
    assert "(evaluating on the first 2000 test samples)" in result.stderr

    expected = {"config.json", "metrics.jsonl", "model.pt", "checkpoint.pt", "summary.json", "curves.png",
                "curves.json", "ensemble.log", "libE_stats.txt"}
    names = {p.name for p in run_dir.iterdir()}
    assert expected <= names, names
    assert any(n.startswith("libE_history") and n.endswith(".npy") for n in names)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["samples"] == 40 * 2 * 64
    assert summary["n_workers"] == 2 and summary["dataset"] == "fashion-mnist" and summary["test_samples"] == 2000
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


def test_standalone_dry_run():
    result = run_cli("mnist/nn.py", "--dry-run", "--dataset", "fashion-mnist")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: 1 steps")

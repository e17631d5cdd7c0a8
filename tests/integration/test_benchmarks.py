"""The batch-scaling and speedup benchmarks run end to end, and the figures the README shows are sound."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from tests.conftest import ROOT, run_cli

RESULTS = ROOT / "benchmarks" / "results"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)


def assert_batch_scaling_data(result: dict, batch_sizes: list[int], lrs: list[float]) -> None:
    """One best entry per batch size, at most one run per (batch, lr), and the slopes between reached points."""
    assert [b["batch"] for b in result["best"]] == batch_sizes
    tried = [(r["batch"], r["lr"]) for r in result["runs"]]
    assert len(set(tried)) == len(tried) and {b for b, _ in tried} == set(batch_sizes)
    assert {lr for _, lr in tried} <= set(lrs)
    for run in result["runs"]:
        assert run["stopped"] in {"target", "budget", "pruned", "diverged"}
        assert (run["steps_to_target"] is not None) == (run["stopped"] == "target")
        assert run["evaluations"] or run["stopped"] == "diverged"
    for best in result["best"]:
        if best["steps_to_target"] is not None:
            assert best["lr"] in lrs
            assert 0 <= best["previous_eval_step"] < best["steps_to_target"]
    reached = [b for b in result["best"] if b["steps_to_target"] is not None]
    assert len(result["regimes"]) == max(0, len(reached) - 1)


def assert_speedup_data(result: dict, workers: list[int], modes: list[str]) -> None:
    """One row per (contender, mode, N), each with its rate, speedup and efficiency."""
    rows = result["rows"]
    assert sorted((r["contender"], r["mode"], r["n"]) for r in rows) == sorted(
        (c, m, n) for c in result["args"]["contenders"] for m in modes for n in workers)
    for r in rows:
        assert r["samples_per_s"] > 0 and r["epoch_s"] == pytest.approx(60_000 / r["samples_per_s"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["n"])
        if r["n"] == min(workers):
            assert r["speedup"] == pytest.approx(r["n"])
        if r["mode"] == "global":
            assert r["global_batch"] == result["args"]["global_batch"]
        else:
            assert r["per_worker_batch"] == result["args"]["per_worker_batch"]


def test_batch_scaling_smoke(tmp_path, fashion_files):
    result = run_cli("benchmarks/batch_scaling.py", "--batch-sizes", "64", "256", "--lrs", "2e-3",
                     "--target", "0.5", "--limit-train", "2048", "--limit-test", "1000", "--max-epochs", "2",
                     "--eval-samples", "2048",
                     "--out", str(tmp_path),
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_png(tmp_path / "batch-scaling.png")
    data = json.loads((tmp_path / "batch-scaling.json").read_text())
    assert_batch_scaling_data(data, [64, 256], [2e-3])
    assert len(data["runs"]) == 2
    assert all(b["steps_to_target"] is not None for b in data["best"]), data["best"]
    assert "| 64 |" in (tmp_path / "batch-scaling.md").read_text()


def test_speedup_smoke(tmp_path, fashion_files):
    # One N and one mode (the one that splits the batch) keep this to two launches, one per
    # contender; the other mode differs only in the per-worker batch it passes.
    result = run_cli("benchmarks/speedup.py", "--workers", "2", "--modes", "global", "--global-batch", "64",
                     "--steps", "2", "--warmup", "1", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_png(tmp_path / "speedup.png")
    data = json.loads((tmp_path / "speedup.json").read_text())
    assert_speedup_data(data, [2], ["global"])
    assert [r["per_worker_batch"] for r in data["rows"] if r["contender"] == "ours"] == [32]
    assert "efficiency" in (tmp_path / "speedup.md").read_text()


def test_scaling_and_cost_model_smoke(tmp_path, fashion_files):
    result = run_cli("benchmarks/scaling.py", "--sizes", "2", "--steps", "4", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_png(tmp_path / "scaling.png")
    runs = json.loads((tmp_path / "scaling.json").read_text())["runs"]
    assert [(r["n"], r["topology"], r["servers"]) for r in runs] == [(2, "star", 1), (2, "ring", 1)]
    assert all(r["generator_cpu_ms"] > 0 and r["busiest_server_mb_per_step"] > 0 for r in runs)
    result = run_cli("benchmarks/cost_model.py", "--scaling", str(tmp_path / "scaling.json"), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    model = json.loads((tmp_path / "cost-model.json").read_text())
    star, ring = model["exchange_ms"]["1 Gbit/s"]["star"], model["exchange_ms"]["1 Gbit/s"]["ring"]
    assert star[-1] > ring[-1] and all(a < b for a, b in zip(star, star[1:]))  # star grows with N, ring less


def test_committed_figures_have_their_data_beside_them():
    assert_png(RESULTS / "batch-scaling.png")  # the README shows it
    figures = sorted(RESULTS.glob("*.png"))
    for png in figures:
        assert_png(png)
        assert png.with_suffix(".json").is_file(), f"{png.name} has no {png.stem}.json beside it"
    saved = json.loads((RESULTS / "batch-scaling.json").read_text())
    args = saved["args"]
    assert_batch_scaling_data(saved, sorted(set(args["batch_sizes"])), sorted(set(args["lrs"])))
    if (RESULTS / "speedup.png").exists():  # made by the full run on a quiet machine
        saved = json.loads((RESULTS / "speedup.json").read_text())
        assert_speedup_data(saved, saved["args"]["workers"], saved["args"]["modes"])

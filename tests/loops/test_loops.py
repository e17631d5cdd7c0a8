"""The training loops in-process: the real generator and simulators, routed by tests/fake_ensemble.py.

No libEnsemble manager and no worker processes: each run takes seconds, so the behaviours of
every strategy are checked here, and tests/integration keeps one real-process run per capability.
The data are the first samples of the real Fashion-MNIST (a small test set keeps evaluation
fast); --limit-train keeps the shards and batches those of the full dataset.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from libe_cnn.config import STRATEGIES
from libe_cnn.strategies.gossip import gossip_pairing
from mnist.data import locate
from mnist.model import build_model
from run_libe_cnn import done_line, main
from tests.fake_ensemble import (
    EnsembleTimeout,
    FakeEnsemble,
    prepare_in_process,
    run_ensemble_in_process,
    write_subset,
)
from tests.integration.test_strategies import reference_run
from tests.integration.test_trainer import single_process_steps

PERIODIC = ("param-avg", "weighted-param-avg", "diloco", "easgd", "gossip", "elastic-gossip")


def read_run(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in records if "event" not in r], [r for r in records if r.get("event") == "eval"]


def model(run_dir) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)


def checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def same_model(a, b) -> bool:
    first, second = model(a), model(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def all_finite(run_dir) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model(run_dir).values())


# 3 workers x 16 samples: 16 steps an epoch on 768 samples.
SMALL = ["-n", "3", "--limit-train", "768", "--batch-size", "16"]


# --- every strategy: steps, evaluations, exchanges ---

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_records_its_steps_and_evaluates_at_the_same_samples(loop_data, redis_address, tmp_path,
                                                                           strategy):
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(loop_data), *SMALL, "--max-steps", "8",
            "--eval-every", "4", "--strategy", strategy]
    done = run_ensemble_in_process(argv, redis_address, tmp_path)
    run_dir = done.run_dir
    summary, steps, evals = read_run(run_dir)
    assert summary["strategy"] == strategy and summary["completed"], summary
    assert summary["samples"] == 8 * 3 * 16  # the same sample budget for every strategy
    # Evaluated at the same sample counts, whatever the strategy counts as a step.
    assert [e["samples"] for e in evals] == [4 * 48, 8 * 48]
    assert summary["test_accuracy"] == evals[-1]["test_accuracy"]
    if strategy in ("sync", "ring-allreduce"):
        assert [r["step"] for r in steps] == list(range(1, 9)) and [e["step"] for e in evals] == [4, 8]
        assert summary.get("nonfinite_skipped", 0) == 0
    elif strategy == "async":
        # One record per gradient; evaluations after every N gradients that complete a step.
        assert [r["step"] for r in steps] == list(range(1, 25)) and [e["step"] for e in evals] == [12, 24]
        assert [r["samples"] for r in steps] == [16 * k for k in range(1, 25)]
        assert all(r["staleness"] >= 0 for r in steps) and max(r["staleness"] for r in steps) >= 1
        assert summary["updates"] + summary["dropped"] == 24 and summary["dropped"] == 0
    else:
        # Rounds of 4 local steps, each ending at an evaluation point.
        assert [r["step"] for r in steps] == [4, 8] and [e["step"] for e in evals] == [4, 8]
        if strategy in PERIODIC:
            assert summary["exchanges"] == 1
    if strategy == "local":
        assert "worker_accuracies" not in evals[0] and len(evals[-1]["worker_accuracies"]) == 3
        assert summary["best_worker_accuracy"] == max(evals[-1]["worker_accuracies"])
    assert math.isfinite(summary["train_loss"]) and all_finite(run_dir)
    assert summary["store_bytes_per_sample"] > 0
    # Every buffer is evicted once consumed, so the run's final cleanup finds next to nothing. async
    # may leave the parameter versions only the gradients in flight at the end had loaded: one a worker.
    assert len(done.leftover_keys) <= (3 if strategy == "async" else 0), done.leftover_keys


@pytest.mark.parametrize("strategy", ["gossip", "elastic-gossip", "local"])
def test_rounds_are_cut_short_at_evaluations_and_checkpoints(run, strategy):
    period = [] if strategy == "local" else ["--sync-period", "3"]
    run_dir = run(*SMALL, "--max-steps", "9", "--eval-every", "4", "--checkpoint-every", "5", "--strategy", strategy,
                  *period)
    summary, steps, evals = read_run(run_dir)
    # Round ends: every 3 steps, and at 4 and 8 (evaluations), 5 (a checkpoint), 9 (the end).
    expected = [4, 5, 8, 9] if strategy == "local" else [3, 4, 5, 8, 9]
    assert [r["step"] for r in steps] == expected, steps
    assert [e["step"] for e in evals] == [4, 8, 9]
    assert summary["completed"] and summary["samples"] == 9 * 48
    if strategy != "local":
        assert summary["exchanges"] == len(expected) - 1


def test_async_evaluates_exactly_at_step_boundaries_when_results_come_together(loop_data, redis_address, tmp_path):
    """Rows that arrive while the generator is busy reach it together, as libEnsemble batches them."""
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(loop_data), "-n", "3", "--limit-train", "768",
            "--batch-size", "16", "--max-steps", "6", "--eval-every", "2", "--strategy", "async"]
    done = run_ensemble_in_process(argv, redis_address, tmp_path, coalesce=True)
    summary, steps, evals = read_run(done.run_dir)
    assert [r["step"] for r in steps] == list(range(1, 19))
    assert [(e["step"], e["samples"]) for e in evals] == [(6, 96), (12, 192), (18, 288)]
    assert summary["updates"] == 18 and summary["completed"]
    # Some rows did come together (which ones varies from run to run, as with libEnsemble).
    delivered = [len(rows) for event, _, rows in done.ensemble.log if event == "to_gen"]
    assert sum(delivered) >= 18 and max(delivered) > 1, delivered


# --- async staleness ---

def test_async_drops_gradients_older_than_max_staleness(loop_data, redis_address, tmp_path, capfd):
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(loop_data), *SMALL, "--max-steps", "4",
            "--strategy", "async", "--max-staleness", "0"]
    done = run_ensemble_in_process(argv, redis_address, tmp_path)
    summary, steps, _ = read_run(done.run_dir)
    assert len(steps) == summary["steps"] == 12
    assert all(r["dropped"] == (r["staleness"] > 0) for r in steps)
    assert summary["dropped"] == sum(r["dropped"] for r in steps) > 0
    assert summary["updates"] == 12 - summary["dropped"]
    assert summary["max_staleness_seen"] >= 1
    # One count everywhere, named for what it counts: the header (run_libe_cnn.prepare's) and the done line.
    assert "12 gradients (4 per worker)" in capfd.readouterr().err
    assert (f"done: 12 gradients ({summary['updates']} applied, {summary['dropped']} dropped as stale)"
            in done_line(summary, str(done.run_dir)))


# --- the summary: throughput, breakdown, traffic ---

def test_summary_reports_steady_throughput_breakdown_and_traffic(run):
    run_dir = run("-n", "2", "--limit-train", "768", "--batch-size", "16", "--max-steps", "12", "--eval-every", "5",
                  "--limit-test", "120", "--transport", "redis")  # the traffic counted is Redis's
    summary, _, evals = read_run(run_dir)
    assert [e["step"] for e in evals] == [5, 10, 12]
    assert summary["test_samples"] == 120  # of loop_data's 200
    assert all(round(e["test_accuracy"] * 120, 6).is_integer() for e in evals)
    assert summary["steady_samples_per_s"] > summary["samples_per_s"] > 0  # start-up and evaluation excluded
    parts = summary["breakdown_s"]
    assert set(parts) >= {"fetch_s", "update_s", "publish_s", "exposed_s", "sim_compute_s", "sim_load_s",
                          "sim_put_s", "sim_exchange_s"}
    assert all(v >= 0 for v in parts.values()) and parts["sim_compute_s"] > 0
    # Streamed: the store traffic ran in the simulators' background threads.
    assert parts["sim_exchange_s"] > 0
    # Each step N gradients go in and out, one parameter copy in and N out: 7 x 4.8 MB at N=2.
    assert 7 * 4.7e6 < summary["store_bytes_per_step"] < 7 * 5.0e6
    assert summary["peak_manager_rss_mb"] > 0 and summary["peak_sim_rss_mb"] > 0
    # The learning curves, drawn from the metrics at the end.
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [curves] = json.loads((run_dir / "curves.json").read_text())["runs"]
    assert curves["train"]["step"] == list(range(1, 13))


def test_16_bit_wires_train_and_halve_the_traffic(run):
    options = ["-n", "2", "--limit-train", "768", "--batch-size", "16", "--max-steps", "8", "--transport", "redis"]
    runs = {dtype: read_run(run(*options, "--wire-dtype", dtype, name=dtype))[0]
            for dtype in ("float32", "bfloat16", "float16")}
    for wire in ("bfloat16", "float16"):
        assert runs[wire]["wire_dtype"] == wire and runs[wire]["completed"]
        assert runs[wire]["test_accuracy"] > 0.3, runs[wire]  # chance is 0.1
        assert runs[wire]["train_loss"] < 2.0, runs[wire]
        ratio = runs[wire]["store_bytes_per_step"] / runs["float32"]["store_bytes_per_step"]
        assert 0.45 < ratio < 0.55, (wire, ratio)


def test_diloco_sends_int8_pseudo_gradients_with_error_feedback(run):
    """Rounds of 2 steps: of 8 rounds, the first parameters and the results of the last (a
    checkpoint, with the workers' states in float32 beside them) go whole."""
    options = ["-n", "2", "--limit-train", "768", "--batch-size", "16", "--max-steps", "16", "--strategy", "diloco",
               "--sync-period", "2", "--transport", "redis"]
    runs = {dtype: read_run(run(*options, "--wire-dtype", dtype, name=dtype))[0] for dtype in ("float32", "int8")}
    assert runs["int8"]["completed"] and runs["int8"]["exchanges"] == 7
    assert runs["int8"]["test_accuracy"] > runs["float32"]["test_accuracy"] - 0.05, runs
    ratio = runs["int8"]["store_bytes_per_step"] / runs["float32"]["store_bytes_per_step"]
    assert 0.25 < ratio < 0.5, ratio  # 0.46 here, 0.34 without the states


def test_int8_wire_trains_on_a_quarter_of_the_bytes(run):
    """Steps 1-15 of 16 travel in int8 both ways (the first parameters and the gradients of the
    last step, a checkpoint, whole): about 0.3 of float32's bytes over the run."""
    options = ["-n", "2", "--limit-train", "768", "--batch-size", "16", "--max-steps", "16", "--transport", "redis"]
    runs = {dtype: read_run(run(*options, "--wire-dtype", dtype, name=dtype))[0] for dtype in ("float32", "int8")}
    int8 = runs["int8"]
    assert int8["wire_dtype"] == "int8" and int8["completed"] and int8["reduce_topology"] == "star"
    assert int8["test_accuracy"] > runs["float32"]["test_accuracy"] - 0.05, runs
    ratio = int8["store_bytes_per_step"] / runs["float32"]["store_bytes_per_step"]
    assert 0.25 < ratio < 0.33, ratio


@pytest.mark.parametrize("strategy", [[], ["--strategy", "diloco", "--sync-period", "2"]], ids=["sync", "diloco"])
def test_int8_resumed_at_a_checkpoint_ends_bit_for_bit_where_an_uninterrupted_run_does(run, strategy):
    """At checkpoints both directions travel whole and no rounding is owed: the resumed run
    starts from exactly what the uninterrupted one had there."""
    options = [*RESUMABLE, "--wire-dtype", "int8", "--checkpoint-every", "3", *strategy]
    whole = run(*options, "--max-steps", "6", name="whole")
    part = run(*options, "--max-steps", "3", name="part")
    run("--resume", str(part), "--max-steps", "6")
    assert read_run(part)[0]["resumed_at_steps"] == [3] and same_model(whole, part)
    assert [r["loss"] for r in read_run(whole)[1]] == [r["loss"] for r in read_run(part)[1]]


# --- checkpoints and resuming ---

RESUMABLE = ["-n", "2", "--limit-train", "768", "--batch-size", "16"]  # 24 steps an epoch


@pytest.mark.parametrize("dropout", [True, False], ids=["dropout", "no-dropout"])
def test_sync_stopped_and_resumed_ends_bit_for_bit_where_an_uninterrupted_run_does(run, dropout):
    options = [*RESUMABLE, "--max-steps", "8", "--checkpoint-every", "3", *([] if dropout else ["--no-dropout"])]
    whole = run(*options, name="whole")
    # Stopped (as by Ctrl-C) once the generator has the rows of 4 steps and one more. The
    # gradients of the fifth step come before its rows: if they were all in, that step is kept.
    stopped = run(*options, name="stopped", stop_after=4 * 2 + 1)
    summary, steps, _ = read_run(stopped)
    at = summary["steps"]
    assert summary["completed"] is False and at in (4, 5)
    assert checkpoint(stopped)["step"] == at  # sync checkpoints the step it stopped at, not a multiple of 3
    resumed = run("--resume", str(stopped), "--max-steps", "8")
    assert resumed == stopped
    summary, steps, _ = read_run(stopped)
    assert summary["completed"] and summary["steps"] == 8 and summary["resumed_at_steps"] == [at]
    assert same_model(whole, stopped)
    # The metrics read as one run: each step once, with the same losses.
    assert [(r["step"], r["loss"]) for r in steps] == [(r["step"], r["loss"]) for r in read_run(whole)[1]]


@pytest.mark.parametrize("strategy, dropout", [("easgd", True), ("easgd", False), ("diloco", True)],
                         ids=["easgd-dropout", "easgd-no-dropout", "diloco"])
def test_a_periodic_run_stopped_mid_round_resumes_from_its_last_checkpoint(run, strategy, dropout):
    """Besides the workers' states, the checkpoint holds the center (easgd) or the parent and its
    outer optimizer's momentum (diloco)."""
    options = [*RESUMABLE, "--strategy", strategy, "--max-steps", "8", "--checkpoint-every", "3",
               *([] if dropout else ["--no-dropout"])]
    whole = run(*options, name="whole")
    assert checkpoint(whole)["step"] == 8  # the end
    # Rounds end at 3, 6 (checkpoints) and 8: stopped after round two and one row of round three.
    stopped = run(*options, name="stopped", stop_after=2 * 2 + 1)
    saved = checkpoint(stopped)
    assert saved["step"] == 6 and saved["positions"] == [6, 6] and len(saved["workers"]) == 2
    assert json.loads((stopped / "summary.json").read_text())["completed"] is False
    run("--resume", str(stopped), "--max-steps", "8")
    summary, steps, _ = read_run(stopped)
    assert summary["completed"] and summary["resumed_at_steps"] == [6]
    assert same_model(whole, stopped)
    assert [(r["step"], r["loss"]) for r in steps] == [(r["step"], r["loss"]) for r in read_run(whole)[1]]


@pytest.mark.parametrize("strategy, agg_prob", [("gossip", []), ("elastic-gossip", ["--agg-prob", "0.5"])])
def test_gossip_stopped_after_its_checkpoint_resumes_from_the_boundary(run, strategy, agg_prob):
    """Stopped mid-round, a periodic run keeps the checkpoint of the last multiple of --checkpoint-every,
    even with rounds recorded after it; resumed from there, it ends where an uninterrupted run does,
    with the same pairs skipping the same rounds (--agg-prob)."""
    options = [*RESUMABLE, "--strategy", strategy, "--sync-period", "2", "--max-steps", "8",
               "--checkpoint-every", "3", *agg_prob]
    whole = run(*options, name="whole")
    # Four rounds draw a pairing (those starting at 2, 3, 5, 6); with --agg-prob 0.5 and seed 1 the
    # single pair skips the rounds at 2 and 3 (the second drawn by the resumed run) and exchanges at 5 and 6.
    exchanges = 4 if not agg_prob else 2
    if agg_prob:
        assert [bool((gossip_pairing(2, r, 1, "random", 0.5) >= 0).any()) for r in range(4)] == [False] * 2 + [True] * 2
    assert read_run(whole)[0]["exchanges"] == exchanges
    # Rounds end at 2, 3 (a checkpoint), 5, 6 (a checkpoint), 8: stopped after three rounds and one row.
    stopped = run(*options, name="stopped", stop_after=3 * 2 + 1)
    _, steps, _ = read_run(stopped)
    assert [r["step"] for r in steps] == [2, 3, 5]
    assert checkpoint(stopped)["step"] == 3
    run("--resume", str(stopped), "--max-steps", "8")
    summary, steps, _ = read_run(stopped)
    assert summary["completed"] and summary["resumed_at_steps"] == [3]
    assert [r["step"] for r in steps] == [2, 3, 5, 6, 8]
    assert summary["exchanges"] == exchanges
    assert same_model(whole, stopped)
    assert [(r["step"], r["loss"]) for r in steps] == [(r["step"], r["loss"]) for r in read_run(whole)[1]]


def test_async_resumes_from_each_workers_position(run):
    run_dir = run(*RESUMABLE, "--strategy", "async", "--max-steps", "4")
    saved = checkpoint(run_dir)
    assert saved["step"] == 8 and sum(saved["positions"]) == 8  # async counts single gradients
    run("--resume", str(run_dir), "--max-steps", "8")
    summary, steps, _ = read_run(run_dir)
    assert summary["completed"] and summary["steps"] == 16 and summary["resumed_at_steps"] == [8]
    assert [r["step"] for r in steps] == list(range(1, 17))


def test_resume_refuses_what_would_make_another_experiment(run, tmp_path, capsys):
    """The refusals happen before anything starts: run_libe_cnn.main in this process, on an in-process run."""
    run_dir = run(*RESUMABLE, "--max-steps", "3")
    saved = {p.name: p.read_bytes() for p in run_dir.iterdir()}

    def refused(*args: str) -> str:
        capsys.readouterr()
        assert main(["--resume", str(run_dir), *args]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1, errors
        return errors[0]

    assert "--lr cannot change when resuming" in refused("--lr", "0.1")
    assert "-n cannot change when resuming" in refused("-n", "3")
    assert "already took its 3 steps: raise --epochs or --max-steps" in refused()
    assert "name different directories" in refused("--run-dir", str(tmp_path / "other"))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == saved  # nothing touched
    (run_dir / "checkpoint.pt").write_bytes(saved["checkpoint.pt"][:1000])
    assert "checkpoint.pt is unreadable" in refused("--max-steps", "5")
    (run_dir / "checkpoint.pt").unlink()
    assert "has no checkpoint.pt" in refused("--max-steps", "5")
    capsys.readouterr()
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
    (tmp_path / "not-a-run").mkdir()
    assert main(["--resume", str(tmp_path / "not-a-run")]) == 2
    assert "has no config.json" in capsys.readouterr().err


# --- non-finite results ---

# SGD at this learning rate blows the weights up in one step (as in tests/integration/test_faults.py).
DIVERGING = ["-n", "2", "--limit-train", "768", "--batch-size", "16", "--optimizer", "sgd", "--lr", "1e20",
             "--no-dropout", "--max-steps", "6"]


@pytest.mark.parametrize("strategy", ["sync", "async"])
def test_nonfinite_gradients_can_be_skipped_and_counted(run, strategy):
    run_dir = run(*DIVERGING, "--strategy", strategy, "--on-nonfinite", "skip")
    summary, steps, _ = read_run(run_dir)
    assert summary["completed"]
    assert summary["nonfinite_skipped"] == sum(int(r["nonfinite"]) for r in steps) > 0
    assert all_finite(run_dir)


def test_nonfinite_gradient_stops_the_run_keeping_the_last_good_parent(run, tmp_path):
    with pytest.raises(Exception) as raised:
        run(*DIVERGING)
    error = raised.value
    assert type(error).__name__ == "NonFinite", repr(error)
    message = str(error)
    assert "non-finite gradient" in message and "at step 2" in message, message
    assert "worker 1" in message and "worker 2" in message
    run_dir = tmp_path / "run"
    assert all_finite(run_dir)  # the parent after step 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False and "non-finite" in summary["error"]
    assert summary["steps"] == summary["checkpoint_step"] == checkpoint(run_dir)["step"] == 1


# --- parity: the ensemble computes what one process computes with the same math ---

@pytest.mark.parametrize("steps", [1, 3])
def test_parity_with_single_process_on_the_union_batch(run, loop_data, steps):
    seed, n_train, batch, lr = 3, 1024, 16, 0.05
    run_dir = run("-n", "2", "--limit-train", str(n_train), "--batch-size", str(batch), "--max-steps", str(steps),
                  "--reduce", "mean", "--no-dropout", "--optimizer", "sgd", "--lr", str(lr), "--seed", str(seed))
    ensemble = model(run_dir)
    reference = single_process_steps(locate("fashion-mnist", loop_data), seed, n_train, 2, batch, steps, lr)
    initial = build_model(seed, dropout=False).state_dict()
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        np.testing.assert_allclose(ensemble[name].numpy(), value.numpy(), atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("strategy, period, agg_prob", [
    ("param-avg", 4, None), ("weighted-param-avg", 4, None), ("easgd", 4, None), ("gossip", 4, None),
    ("elastic-gossip", 4, None), ("local", None, None), ("diloco", 2, None),
    # Rounds end at 2, 4 and 6; with seed 5 the pairing of the round at 2 skips its pair, the one at 4 keeps it.
    ("gossip", 2, 0.5), ("elastic-gossip", 2, 0.5),
])
def test_parity_with_the_same_math_in_one_process(run, loop_data, strategy, period, agg_prob):
    seed, n_train, n, batch, steps, lr = 5, 1536, 3, 16, 6, 0.05
    period_args = [] if period is None else ["--sync-period", str(period)]
    if agg_prob is not None:
        period_args += ["--agg-prob", str(agg_prob)]
        assert [bool((gossip_pairing(n, r, seed, "random", agg_prob) >= 0).any()) for r in range(2)] == [False, True]
    run_dir = run("-n", str(n), "--limit-train", str(n_train), "--batch-size", str(batch), "--max-steps", str(steps),
                  "--no-dropout", "--optimizer", "sgd", "--lr", str(lr), "--seed", str(seed), "--strategy", strategy,
                  *period_args)
    ensemble = model(run_dir)
    reference = reference_run(locate("fashion-mnist", loop_data), strategy, seed, n_train, n, batch, steps, lr,
                              period or steps, agg_prob or 1.0)
    if agg_prob is not None:  # a round whose pairs all skip is no exchange
        assert read_run(run_dir)[0]["exchanges"] == 1
    initial = build_model(seed, dropout=False).state_dict()
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]), f"{name} did not train"
        np.testing.assert_allclose(ensemble[name].numpy(), value.numpy(), atol=1e-5, rtol=0, err_msg=name)


# --- the harness itself: failures surface, nothing hangs ---

def test_a_simulator_failure_is_raised_and_stops_the_generator(fashion_files, redis_address, tmp_path):
    data = write_subset(fashion_files, tmp_path / "data", n_train=768, n_test=50)
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(data), *SMALL, "--max-steps", "4"]
    plan = prepare_in_process(argv, redis_address, tmp_path / "run")
    # The simulators read their shards when they start, after the plan checked the files.
    for path in (data / "FashionMNIST" / "raw").glob("train-*"):
        path.write_bytes(b"")
    ensemble = FakeEnsemble(plan, timeout=60)
    with pytest.raises(Exception) as raised:
        ensemble.run()
    assert "simulator" in "".join(getattr(raised.value, "__notes__", [])), raised.value
    # As libEnsemble's manager does, the generator was told to stop, and everyone has returned.
    assert 0 in ensemble.stopped and not any(t.is_alive() for t in ensemble.threads.values())


class DroppingEnsemble(FakeEnsemble):
    """Loses every simulator row: the generator waits for them forever."""

    def _on_message(self, worker_id, args):
        if worker_id != 0:
            return
        super()._on_message(worker_id, args)


def test_a_run_that_hangs_fails_within_its_timeout_and_stops_its_threads(loop_data, redis_address, tmp_path):
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(loop_data), *SMALL, "--max-steps", "4"]
    plan = prepare_in_process(argv, redis_address, tmp_path / "run")
    ensemble = DroppingEnsemble(plan, timeout=4)
    with pytest.raises(EnsembleTimeout, match="did not end within 4 s"):
        ensemble.run()
    assert not any(t.is_alive() for t in ensemble.threads.values())


def test_the_fake_manager_routes_like_only_persistent_gens():
    """The routing rules themselves, on stub functions that talk through PersistentSupport."""
    from types import SimpleNamespace

    from libensemble.comms.comms import Timeout
    from libensemble.message_numbers import (
        EVAL_GEN_TAG,
        EVAL_SIM_TAG,
        FINISHED_PERSISTENT_GEN_TAG,
        FINISHED_PERSISTENT_SIM_TAG,
        PERSIS_STOP,
    )
    from libensemble.tools.persistent_support import PersistentSupport

    from libe_cnn.plan import GEN_OUT, SIM_OUT

    def int_field(dtype) -> str:  # the stubs carry a number in whichever integer field the rows have
        return next(name for name in np.dtype(dtype).names if np.dtype(dtype)[name].kind == "i")

    tag_out, tag_in = int_field(GEN_OUT), int_field(SIM_OUT)
    received, stops, started = [], [], []

    def gen(H, persis_info, gen_specs, libE_info):
        ps = PersistentSupport(libE_info, EVAL_GEN_TAG)
        rows = np.zeros(2, dtype=gen_specs["out"])
        rows[tag_out] = [10, 11]
        ps.send(rows)
        while len(received) < 6:
            try:  # the generator's way of waiting: recv with a timeout, then push the message back
                message = ps.comm.recv(timeout=0.5)
            except Timeout:
                continue
            ps.comm.push_to_buffer(*message)
            tag, _, calc_in = ps.recv()
            assert tag == EVAL_GEN_TAG and calc_in.dtype.names == tuple(gen_specs["persis_in"])
            for row in calc_in:
                received.append(int(row[tag_in]))
                if len(received) <= 4:
                    answer = np.zeros(1, dtype=gen_specs["out"])
                    answer[tag_out] = 20 + len(received)
                    ps.send(answer)
        return None, persis_info, FINISHED_PERSISTENT_GEN_TAG

    def sim(H, persis_info, sim_specs, libE_info):
        started.append((libE_info["workerID"], int(H[0][tag_out]), H.dtype == np.dtype(GEN_OUT)))
        ps = PersistentSupport(libE_info, EVAL_SIM_TAG)
        row = H[0]
        while True:
            out = np.zeros(1, dtype=sim_specs["out"])
            out[tag_in] = row[tag_out]
            tag, _, calc_in = ps.send_recv(out)
            if tag == PERSIS_STOP:
                stops.append(libE_info["workerID"])
                return None, persis_info, FINISHED_PERSISTENT_SIM_TAG
            row = calc_in[0]

    ensemble = FakeEnsemble(SimpleNamespace(config=SimpleNamespace(n_workers=2), shm_dir=None), timeout=20)
    ensemble.gen_f, ensemble.sim_f = gen, sim
    ensemble.run()
    # The first N rows start workers 1..N, each with its row as H.
    assert sorted(started) == [(1, 10, True), (2, 11, True)]
    # Every answer goes to a simulator that waits; each result reaches the generator once.
    assert sorted(received) == [10, 11, 21, 22, 23, 24]
    assert sorted(stops) == [1, 2] and not any(t.is_alive() for t in ensemble.threads.values())
    to_gen = [rows for event, _, rows in ensemble.log if event == "to_gen"]
    assert [len(rows) for rows in to_gen] == [1] * 6  # one row a message: as soon as it is sent

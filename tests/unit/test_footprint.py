"""The memory estimate a run is checked against before it starts (libe_cnn/footprint.py)."""

import pytest

from libe_cnn import strategies
from libe_cnn.config import TrainConfig
from libe_cnn.errors import UserError
from libe_cnn.footprint import MB, check_fits, estimate


def test_each_worker_adds_its_process_its_data_and_its_copies_of_the_parameters():
    one, two = (estimate(300 * MB, "fashion-mnist", 60_000, 8192, 10_000, n, 1_200_000) for n in (1, 2))
    # Every worker reads the whole training file, then keeps its shard as float32.
    assert one.per_worker - two.per_worker == 4 * 784 * (8192 - 8192 // 2)
    assert one.per_worker > 300 * MB + 60_000 * 784 + 8 * 4 * 1_200_000 - 1
    assert estimate(300 * MB, "fashion-mnist", 60_000, 8192, 10_000, 100, 1_200_000).total > 30 * 2**30


def test_a_run_that_does_not_fit_is_refused_with_how_many_workers_would():
    footprint = estimate(300 * MB, "fashion-mnist", 60_000, 8192, 10_000, 100, 1_200_000)
    check_fits(footprint, footprint.total)  # exactly enough is enough
    with pytest.raises(UserError) as refused:
        check_fits(footprint, 20 * 2**30)
    fit = footprint.workers_that_fit(20 * 2**30)
    assert str(refused.value).startswith("-n 100 needs about ") and str(refused.value).endswith(f"use -n {fit} or fewer")
    assert footprint.fixed + fit * footprint.per_worker <= 20 * 2**30 < footprint.fixed + (fit + 1) * footprint.per_worker
    with pytest.raises(UserError, match="not even one worker fits"):
        check_fits(footprint, footprint.fixed)


def test_diloco_with_one_inner_step_a_round_warns(tmp_path):
    assert strategies.option_warnings(TrainConfig(strategy="diloco", run_dir=str(tmp_path))) == []
    [warning] = strategies.option_warnings(TrainConfig(strategy="diloco", sync_period=1, run_dir=str(tmp_path)))
    assert warning.startswith("--sync-period 1 gives diloco one inner step per round")
    assert strategies.option_warnings(TrainConfig(strategy="param-avg", sync_period=1, run_dir=str(tmp_path))) == []

"""The in-process runs of tests/loops: a small slice of the real Fashion-MNIST, and one run
of the trainer on it (the real generator and simulators, a real Redis, tests/fake_ensemble.py)."""

from __future__ import annotations

import pytest

from tests.fake_ensemble import run_in_process, write_subset


@pytest.fixture(scope="session")
def loop_data(fashion_files, tmp_path_factory):
    """The first 1536 training and 200 test images of Fashion-MNIST, as a --data-dir."""
    return write_subset(fashion_files, tmp_path_factory.mktemp("fashion"), n_train=1536, n_test=200)


@pytest.fixture
def run(loop_data, redis_address, tmp_path):
    """run(*options, name="run", **harness_options): one in-process run on loop_data; its directory.
    A --resume run takes its options as they are."""
    def run_(*options: str, name: str = "run", **harness):
        argv = list(options) if "--resume" in options else \
            ["--dataset", "fashion-mnist", "--data-dir", str(loop_data), *options]
        return run_in_process(argv, redis_address, tmp_path, name, **harness)
    return run_

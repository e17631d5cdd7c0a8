"""How much memory a run needs, against what this machine has: checked before any worker starts.

A run that does not fit is otherwise killed by the kernel part way through start-up, with no
word and with its workers left holding the memory. The estimate is deliberately simple: every
process starts with as much private memory as the manager has before it reads any data (torch
imported), then adds its data and its copies of the parameters; the libraries' pages, which
all processes share, count once.
"""

from __future__ import annotations

from dataclasses import dataclass

from libe_cnn.errors import UserError

MB = 2**20
# Values in one training sample, as the files hold them (one byte each) and as a worker keeps them (float32).
SAMPLE_VALUES = {"mnist": 784, "fashion-mnist": 784, "cifar10": 3 * 32 * 32, "iris": 4}
# Samples in each dataset's test split, which the manager keeps for its evaluations.
TEST_SAMPLES = {"mnist": 10_000, "fashion-mnist": 10_000, "cifar10": 10_000, "iris": 30}
# Copies of the parameters a worker holds: the model, its gradient, two optimizer moments, the
# parameters it receives, the gradient it sends and its staging buffers. The generator holds as
# many, and Redis holds each worker's gradient and the published parameters of a step or two.
WORKER_COPIES = 8
MANAGER_COPIES = 8
STORE_COPIES_PER_WORKER = 3


@dataclass(frozen=True)
class Footprint:
    """Bytes a run needs: per worker, and for the manager with its store."""

    per_worker: int
    fixed: int
    n_workers: int

    @property
    def total(self) -> int:
        return self.n_workers * self.per_worker + self.fixed

    def workers_that_fit(self, available: int) -> int:
        return max(0, (available - self.fixed) // self.per_worker)


def estimate(process: int, dataset: str, n_total: int, n_train: int, n_test: int, n_workers: int,
             parameters: int, shared: int = 0) -> Footprint:
    """The footprint of a run whose processes each start at `process` private bytes.

    n_total: the training samples in the files (a worker reads them all before it keeps its shard).
    shared: the pages of files every process maps (torch's libraries), counted once.
    """
    values = SAMPLE_VALUES[dataset]
    param_bytes = 4 * parameters
    worker = process + n_total * values + 4 * values * (n_train // n_workers) + WORKER_COPIES * param_bytes
    manager = process + 4 * values * n_test + MANAGER_COPIES * param_bytes
    store = STORE_COPIES_PER_WORKER * n_workers * param_bytes
    return Footprint(per_worker=worker, fixed=manager + store + shared, n_workers=n_workers)


def check_fits(footprint: Footprint, available: int) -> None:
    """Refuse a run that cannot fit in `available` bytes, saying how many workers would.

    Raises:
        UserError: one line with the estimate, what is available, and what to change.
    """
    if footprint.total <= available:
        return
    fit = footprint.workers_that_fit(available)
    advice = f"use -n {fit} or fewer" if fit >= 1 else "not even one worker fits"
    raise UserError(f"-n {footprint.n_workers} needs about {footprint.total / 2**30:.1f} GB of memory "
                    f"({footprint.n_workers} workers x {footprint.per_worker / MB:.0f} MB, the manager and Redis "
                    f"{footprint.fixed / MB:.0f} MB) and {available / 2**30:.1f} GB is available here: {advice}")

"""weighted-param-avg: as param-avg, but parent <- (1 - lambda) parent + lambda mean(workers).

SlowMo with no slow momentum and slow learning rate lambda (Wang et al. 2020); lambda = 1
is param-avg.
"""

from __future__ import annotations

import numpy as np

from libe_cnn.strategies.base import SYNC_PERIOD, Option, Periodic, average_parameters

MIX_LAMBDA = Option(
    "mix_lambda", "--mix-lambda", "parent = (1-L) parent + L mean(workers)", default=0.5, type=float, metavar="L",
    check=lambda v, n: None if 0 < v <= 1 else f"--mix-lambda must be in (0, 1] (got {v})")


def mix_parameters(parent: np.ndarray, workers_mean: np.ndarray, mix_lambda: float) -> np.ndarray:
    """parent <- (1 - lambda) * parent + lambda * mean(workers), in place."""
    parent += np.float32(mix_lambda) * (workers_mean - parent)
    return parent


class WeightedParamAvg(Periodic):
    def combine(self, cfg, parent, results) -> None:
        mix_parameters(parent, average_parameters(results, np.empty_like(parent)), cfg.mix_lambda)


STRATEGY = WeightedParamAvg("weighted-param-avg", "as param-avg, mixing the workers' mean into the parent",
                            options=(SYNC_PERIOD, MIX_LAMBDA))

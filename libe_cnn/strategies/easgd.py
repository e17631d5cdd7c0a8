"""easgd: every K steps each worker moves alpha toward the center, and the center alpha * sum toward them.

Synchronous elastic averaging SGD: Zhang, Choromanska, LeCun, NeurIPS 2015. The generator
holds the center. Both moves are computed from the same values (the center sent at the
round's start, the parameters the workers send at its end), so center + sum(workers) is
unchanged by an exchange.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from libe_cnn.strategies.base import SYNC_PERIOD, Option, Periodic

# alpha = beta / N with the paper's beta = 0.9 (Zhang et al. 2015, sec. 5).
EASGD_BETA = 0.9
ELASTIC_ALPHA = Option(
    "elastic_alpha", "--elastic-alpha", "moving rate of workers and center (at most 1/N)", type=float, metavar="A",
    default_text=f"{EASGD_BETA}/N",
    check=lambda v, n: None if 0 < v * n <= 1 else (f"--elastic-alpha must be positive and at most 1/N = {1 / n:.4g}, "
                                                    f"or the center overshoots (got {v})"))


def elastic_alpha(cfg) -> float:
    """The moving rate: given, or beta / N (N may be set by an MPI launch after parsing)."""
    return cfg.elastic_alpha if cfg.elastic_alpha is not None else EASGD_BETA / cfg.n_workers


def elastic_pull(worker: np.ndarray, center: np.ndarray, alpha: float) -> np.ndarray:
    """A worker's step toward the center: x_i <- x_i - alpha (x_i - center), in place."""
    worker -= np.float32(alpha) * (worker - center)
    return worker


def elastic_center_update(center: np.ndarray, workers: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """The center's step: center <- center + alpha * sum_i (x_i - center), in place."""
    if not workers or any(w.shape != center.shape for w in workers):
        raise ValueError("workers must be one or more buffers of the center's shape")
    pull = np.zeros_like(center)
    for w in workers:
        pull += w - center
    center += np.float32(alpha) * pull
    return center


class Easgd(Periodic):
    def combine(self, cfg, parent, results) -> None:
        elastic_center_update(parent, results, elastic_alpha(cfg))

    def receive(self, worker, row, t, memo) -> None:
        if row["params_key"]:
            memo["center"] = worker.load_params(str(row["params_key"])).copy()  # this round's pull goes toward it
            if t == 0:  # everyone starts from the center
                worker.set_params(memo["center"])

    def after_put(self, worker, memo) -> None:
        # The worker's half of the exchange; the generator moves the center by the same amount
        # from the parameters just sent.
        worker.update_params(lambda host: elastic_pull(host, memo["center"], elastic_alpha(worker.cfg)))


STRATEGY = Easgd("easgd", "workers and a center held by the generator pull toward each other every K steps",
                 options=(SYNC_PERIOD, ELASTIC_ALPHA))

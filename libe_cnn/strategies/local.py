"""local: no communication; each worker trains alone on its shard.

The baseline every other strategy must beat; one-shot averaging (Zinkevich et al. 2010).
The generator evaluates the workers' mean model at every evaluation and, at the end, each
worker's own model too (the best is reported).
"""

from __future__ import annotations

import numpy as np

from libe_cnn.strategies.base import Periodic, average_parameters


class Local(Periodic):
    def round_end_limit(self, cfg, start, total) -> int:
        return total  # rounds end only where the run evaluates or checkpoints

    def round_keys(self, run, start, exchanges) -> tuple[str, str]:
        if start == 0:  # everyone starts from the parent
            return super().round_keys(run, start, exchanges)
        return "", ""

    def combine(self, cfg, parent, results) -> None:
        average_parameters(results, parent)  # the model to evaluate: the workers' mean

    def final_evaluation(self, run, results: list[np.ndarray]) -> dict:
        """Each worker's own model, once: N more evaluations."""
        accuracies = [run.evaluate_parameters(model) for model in results]
        best = int(np.argmax(accuracies))
        return {"best_worker_accuracy": accuracies[best], "best_worker": best, "worker_accuracies": accuracies}


STRATEGY = Local("local", "no communication: each worker trains alone; the parent is their mean",
                 combines_every_round=False, exchanges=False)

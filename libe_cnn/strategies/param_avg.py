"""param-avg: K local steps per worker, then the parent becomes the workers' mean, sent to all.

Model averaging / local SGD: McMahan et al. 2017 (FedAvg); Stich 2019.
"""

from __future__ import annotations

from libe_cnn.strategies.base import SYNC_PERIOD, Periodic, average_parameters


class ParamAvg(Periodic):
    def combine(self, cfg, parent, results) -> None:
        average_parameters(results, parent)


STRATEGY = ParamAvg("param-avg", "K local steps, then the parent is the workers' mean", options=(SYNC_PERIOD,))

"""elastic-gossip: every K steps workers pair up, and each moves alpha of the way toward its peer.

Elastic Gossip (Pramod, "Elastic Gossip: Distributing Neural Network Training Using
Gossip-like Protocols", 2018): EASGD's elastic move made pairwise, with no center. Both of
a pair move from the values they had before the exchange, x_i <- x_i - alpha (x_i - x_j)
and x_j <- x_j - alpha (x_j - x_i), so the pair's mean, and with it the workers' mean, is
preserved; alpha = 0.5 is gossip's pairwise average. Everything else is gossip's: the
pairing (--gossip-topology, --agg-prob), the peers' keys in the store, and a generator
that only draws the pairing and averages the workers' models to evaluate.
"""

from __future__ import annotations

import numpy as np

from libe_cnn.strategies.base import SYNC_PERIOD, Option
from libe_cnn.strategies.easgd import elastic_pull
from libe_cnn.strategies.gossip import AGG_PROB, GOSSIP_TOPOLOGY, Gossip, GossipCounters

# Each exchange scales a pair's gap by 1 - 2 alpha: alpha = 0.5 closes it, which is gossip's
# average (the strategy would be gossip itself), and a small alpha barely couples the pair.
# 0.25, the middle of the range, halves the gap at each exchange: the pair stays elastic, each
# keeping part of what it learned on its own shard, as EASGD's workers keep part of theirs.
DEFAULT_ALPHA = 0.25
# The same field and flag as easgd's --elastic-alpha, with this strategy's range, default and help.
ELASTIC_ALPHA = Option(
    "elastic_alpha", "--elastic-alpha",
    "how far each of a pair moves toward the other (at most 0.5; 0.5 is gossip's average)",
    default=DEFAULT_ALPHA, type=float, metavar="A",
    check=lambda v, n: None if 0 < v <= 0.5 else (f"--elastic-alpha must be in (0, 0.5] for elastic-gossip: beyond "
                                                  f"0.5 the two overshoot each other (got {v})"))


def elastic_exchange(own: np.ndarray, peer: np.ndarray, alpha: float) -> np.ndarray:
    """One worker's half of a pair's exchange: own <- own - alpha (own - peer), in place.

    EASGD's pull with the peer in the center's place; the peer applies the same to itself
    from the `own` sent before the exchange, so the two moves cancel in the pair's sum.
    """
    return elastic_pull(own, peer, alpha)


class ElasticGossip(Gossip):
    def exchange(self, cfg, own, theirs) -> None:
        elastic_exchange(own, theirs, cfg.elastic_alpha)


STRATEGY = ElasticGossip("elastic-gossip", "every K steps, pairs of workers move part of the way toward each other",
                         options=(SYNC_PERIOD, GOSSIP_TOPOLOGY, AGG_PROB, ELASTIC_ALPHA), needs_peers=True,
                         combines_every_round=False, exchanges=False, counters=GossipCounters)

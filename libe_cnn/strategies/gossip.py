"""gossip: every K steps workers pair up, and each averages its parameters with its peer's.

Randomized gossip (Boyd et al. 2006); decentralized SGD, D-PSGD (Lian et al. 2017). Peers
read each other's parameters straight from the store, under predictable keys: they never
pass through the generator, which only draws the pairing and, to evaluate, averages the
workers' models. Pairwise averaging preserves the workers' mean. With --agg-prob P each pair
of a round exchanges only with probability P: fewer exchanges for the same --sync-period.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from libe_cnn.strategies.base import SYNC_PERIOD, Option, Periodic, RoundCounters, average_parameters

GOSSIP_TOPOLOGY = Option("gossip_topology", "--gossip-topology", "pair workers at random or along a ring",
                         default="random", type=str, choices=("random", "ring"))
AGG_PROB = Option("agg_prob", "--agg-prob", "probability that a pair exchanges in a round", default=1.0,
                  type=float, metavar="P",
                  check=lambda v, n: None if 0 < v <= 1 else f"--agg-prob must be in (0, 1] (got {v})")


@dataclass
class GossipCounters(RoundCounters):
    """gossip's running totals: the rounds that exchanged something, and the pairings drawn."""

    # Pairings drawn, the round index of the next one. With --agg-prob < 1 a round may exchange
    # nothing, so `exchanges` (rounds in which some pair exchanged) can fall behind it.
    rounds: int | None = None

    def __post_init__(self) -> None:
        if self.rounds is None:  # fresh, or a checkpoint from before --agg-prob: every round exchanged
            self.rounds = self.exchanges


def gossip_key(step: int, shard: int) -> str:
    """Where a worker leaves its parameters after `step` local steps, for its peer."""
    return f"gossip-{step}-{shard}"


def gossip_pairing(n: int, round_index: int, seed: int, topology: str, agg_prob: float = 1.0) -> np.ndarray:
    """Who exchanges with whom in one round: peer[i] = j and peer[j] = i, or -1 for none.

    Pairs form a matching, so every exchange is symmetric and the workers' mean is preserved.
    `random` draws a fresh matching per round from (seed, round); `ring` pairs neighbours,
    alternating between even and odd edges so that information travels around the ring.
    With odd N one worker sits each round out. Each pair then exchanges with probability
    `agg_prob`, also drawn from (seed, round), so a resumed run skips the same pairs; the
    draw comes after the matching's, so agg_prob = 1 gives the very pairings of a run without it.
    """
    rng = np.random.default_rng([seed, round_index])
    if topology == "random":
        order = rng.permutation(n)
        pairs = list(zip(order[0::2], order[1::2]))
    elif topology == "ring":
        first = round_index % 2
        pairs = [(i, (i + 1) % n) for i in range(first, n - 1 + (n % 2 == 0), 2)] if n > 1 else []
    else:
        raise ValueError(f"unknown gossip topology {topology!r}")
    exchange = rng.random(len(pairs)) < agg_prob  # every draw is below 1: agg_prob = 1 keeps all
    peer = np.full(n, -1, dtype=np.int64)
    for (i, j), keep in zip(pairs, exchange):
        if keep:
            peer[i], peer[j] = j, i
    return peer


def pairwise_average(own: np.ndarray, peer: np.ndarray) -> np.ndarray:
    """One exchange on a worker: own <- (own + peer) / 2, in place."""
    own += peer
    own *= np.float32(0.5)
    return own


class Gossip(Periodic):
    def exchange(self, cfg, own: np.ndarray, theirs: np.ndarray) -> None:
        """One worker's half of a pair's exchange, in place; `theirs` is what the peer sent."""
        pairwise_average(own, theirs)

    def round_keys(self, run, start, exchanges) -> tuple[str, str]:
        if start == 0:  # everyone starts from the parent
            return super().round_keys(run, start, exchanges)
        # The strategy counts its own exchanges (exchanges=False): only it knows whether a round has any.
        counters: GossipCounters = run.state.counters
        peer = gossip_pairing(run.n, counters.rounds, run.cfg.seed, run.cfg.gossip_topology, run.cfg.agg_prob)
        counters.rounds += 1
        if (peer < 0).all():  # every pair sits this round out: nothing to send
            return "", ""
        counters.exchanges += 1
        return "", run.store.put(peer)

    def combine(self, cfg, parent, results) -> None:
        average_parameters(results, parent)  # the model to evaluate: the workers' mean

    def keeps_results(self) -> bool:
        return True  # each worker's peer reads it next round

    def resume_puts(self, run, step, shard, state) -> list[str]:
        from libe_cnn.wire import to_wire  # torch: not needed to parse the command line

        n_params = run.parent.flat_params.numel()
        return [run.store.put(to_wire(state[:n_params], run.cfg.wire_dtype), gossip_key(step, shard))]

    def receive(self, worker, row, t, memo) -> None:
        super().receive(worker, row, t, memo)
        if row["peers_key"]:
            peer = int(worker.store.get(str(row["peers_key"]))[worker.shard])
            if peer >= 0:  # with odd N, or a pair that skips this round, a worker sits it out
                theirs = worker.load_params(worker.store.key(gossip_key(t, peer)))
                worker.update_params(lambda host: self.exchange(worker.cfg, host, theirs))

    def result_name(self, t, shard) -> str | None:
        return gossip_key(t, shard)


STRATEGY = Gossip("gossip", "every K steps, pairs of workers average their parameters with each other",
                  options=(SYNC_PERIOD, GOSSIP_TOPOLOGY, AGG_PROB), needs_peers=True, combines_every_round=False,
                  exchanges=False, counters=GossipCounters)

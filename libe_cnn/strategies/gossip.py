"""gossip: every K steps workers pair up, and each averages its parameters with its peer's.

Randomized gossip (Boyd et al. 2006); decentralized SGD, D-PSGD (Lian et al. 2017). Peers
read each other's parameters straight from the store, under predictable keys: they never
pass through the generator, which only draws the pairing and, to evaluate, averages the
workers' models. Pairwise averaging preserves the workers' mean.
"""

from __future__ import annotations

import numpy as np

from libe_cnn.strategies.base import SYNC_PERIOD, Option, Periodic, average_parameters

GOSSIP_TOPOLOGY = Option("gossip_topology", "--gossip-topology", "pair workers at random or along a ring",
                         default="random", type=str, choices=("random", "ring"))


def gossip_key(step: int, shard: int) -> str:
    """Where a worker leaves its parameters after `step` local steps, for its peer."""
    return f"gossip-{step}-{shard}"


def gossip_pairing(n: int, round_index: int, seed: int, topology: str) -> np.ndarray:
    """Who averages with whom in one round: peer[i] = j and peer[j] = i, or -1 for none.

    Pairs form a matching, so every exchange is symmetric and the workers' mean is preserved.
    `random` draws a fresh matching per round from (seed, round); `ring` pairs neighbours,
    alternating between even and odd edges so that information travels around the ring.
    With odd N one worker sits each round out.
    """
    peer = np.full(n, -1, dtype=np.int64)
    if topology == "random":
        order = np.random.default_rng([seed, round_index]).permutation(n)
        pairs = zip(order[0::2], order[1::2])
    elif topology == "ring":
        first = round_index % 2
        pairs = [(i, (i + 1) % n) for i in range(first, n - 1 + (n % 2 == 0), 2)] if n > 1 else []
    else:
        raise ValueError(f"unknown gossip topology {topology!r}")
    for i, j in pairs:
        peer[i], peer[j] = j, i
    return peer


def pairwise_average(own: np.ndarray, peer: np.ndarray) -> np.ndarray:
    """One exchange on a worker: own <- (own + peer) / 2, in place."""
    own += peer
    own *= np.float32(0.5)
    return own


class Gossip(Periodic):
    def round_keys(self, run, start, exchanges) -> tuple[str, str]:
        if start == 0:  # everyone starts from the parent
            return super().round_keys(run, start, exchanges)
        return "", run.store.put(gossip_pairing(run.n, exchanges, run.cfg.seed, run.cfg.gossip_topology))

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
            if peer >= 0:  # with odd N, one worker sits a round out
                theirs = worker.load_params(worker.store.key(gossip_key(t, peer)))
                worker.update_params(lambda host: pairwise_average(host, theirs))

    def result_name(self, t, shard) -> str | None:
        return gossip_key(t, shard)


STRATEGY = Gossip("gossip", "every K steps, pairs of workers average their parameters with each other",
                  options=(SYNC_PERIOD, GOSSIP_TOPOLOGY), needs_peers=True, combines_every_round=False)

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from libe_cnn.strategies.async_ import staleness_weight
from libe_cnn.strategies.base import average_parameters
from libe_cnn.strategies.base import reduce_in_order as reduce_gradients
from libe_cnn.strategies.diloco import STRATEGY as DILOCO
from libe_cnn.strategies.diloco import pseudo_gradient
from libe_cnn.strategies.easgd import elastic_center_update, elastic_pull
from libe_cnn.strategies.elastic_gossip import elastic_exchange
from libe_cnn.strategies.gossip import gossip_pairing, pairwise_average
from libe_cnn.strategies.weighted_param_avg import mix_parameters


def grads(n, size=10, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_sum(n):
    g = grads(n)
    out = np.empty(10, np.float32)
    assert reduce_gradients(g, out, "sum") is out
    np.testing.assert_allclose(out, np.sum(g, axis=0), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_mean(n):
    g = grads(n)
    out = np.empty(10, np.float32)
    reduce_gradients(g, out, "mean")
    np.testing.assert_allclose(out, np.mean(g, axis=0), rtol=1e-6)


def test_inputs_are_not_modified_and_read_only_inputs_work():
    g = grads(3)
    frozen = [x.copy() for x in g]
    for x in g:
        x.flags.writeable = False
    reduce_gradients(g, np.empty(10, np.float32), "sum")
    for a, b in zip(g, frozen):
        np.testing.assert_array_equal(a, b)


def test_fixed_order_is_bitwise_reproducible():
    g = grads(4, size=1000)
    a = reduce_gradients(g, np.empty(1000, np.float32), "sum")
    b = reduce_gradients(g, np.empty(1000, np.float32), "sum")
    np.testing.assert_array_equal(a, b)


def test_errors():
    with pytest.raises(ValueError, match="nothing to combine"):
        reduce_gradients([], np.empty(3, np.float32))
    with pytest.raises(ValueError, match="does not match"):
        reduce_gradients(grads(2, size=4), np.empty(3, np.float32))
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_gradients(grads(2), np.empty(10, np.float32), "max")


# --- parameter averaging (param-avg, weighted-param-avg, local) ---

def test_average_of_identical_models_is_a_no_op():
    model = grads(1, size=50)[0]
    out = average_parameters([model.copy() for _ in range(4)], np.empty(50, np.float32))
    np.testing.assert_array_equal(out, model)


def test_average_is_the_mean():
    models = grads(3, size=50)
    out = average_parameters(models, np.empty(50, np.float32))
    np.testing.assert_allclose(out, np.mean(models, axis=0), rtol=1e-6)


def test_mix_interpolates_between_parent_and_mean():
    parent, mean = grads(2, size=20)
    np.testing.assert_allclose(mix_parameters(parent.copy(), mean, 1.0), mean, rtol=1e-6)
    half = mix_parameters(parent.copy(), mean, 0.25)
    np.testing.assert_allclose(half, 0.75 * parent + 0.25 * mean, rtol=1e-5, atol=1e-7)
    # Workers that agree with the parent leave it where it is.
    np.testing.assert_array_equal(mix_parameters(parent.copy(), parent, 0.5), parent)


# --- EASGD ---

def test_easgd_with_alpha_zero_changes_nothing():
    center, *workers = grads(4, size=30)
    before = [w.copy() for w in workers], center.copy()
    for w in workers:
        elastic_pull(w, center, 0.0)
    elastic_center_update(center, workers, 0.0)
    for w, b in zip(workers, before[0]):
        np.testing.assert_array_equal(w, b)
    np.testing.assert_array_equal(center, before[1])


def test_easgd_exchange_is_symmetric_and_conserves_the_total():
    center, *workers = grads(4, size=30)
    alpha = 0.9 / len(workers)
    total_before = center + np.sum(workers, axis=0)
    center_old, workers_old = center.copy(), [w.copy() for w in workers]
    for w in workers:
        elastic_pull(w, center_old, alpha)
    elastic_center_update(center, workers_old, alpha)
    np.testing.assert_allclose(center + np.sum(workers, axis=0), total_before, rtol=1e-5, atol=1e-5)
    # Each worker moved toward the old center by alpha of the distance, the center toward them.
    for w, o in zip(workers, workers_old):
        np.testing.assert_allclose(w, o - alpha * (o - center_old), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(center, center_old + alpha * np.sum([o - center_old for o in workers_old], axis=0),
                               rtol=1e-5, atol=1e-6)


def test_easgd_fixed_point_when_everyone_agrees():
    x = grads(1, size=30)[0]
    center, workers = x.copy(), [x.copy() for _ in range(3)]
    elastic_center_update(center, workers, 0.3)
    np.testing.assert_array_equal(center, x)


# --- gossip ---

def is_matching(peer: np.ndarray) -> bool:
    return all(j == -1 or (j != i and peer[j] == i) for i, j in enumerate(peer))


@pytest.mark.parametrize("topology", ["random", "ring"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8])
def test_pairings_are_matchings(topology, n):
    for r in range(6):
        peer = gossip_pairing(n, r, seed=3, topology=topology)
        assert peer.shape == (n,) and is_matching(peer)
        # Everyone is paired but, with odd N, one worker.
        assert (peer == -1).sum() == n % 2


def test_random_pairing_is_seeded_and_changes_per_round():
    a = [gossip_pairing(8, r, seed=1, topology="random") for r in range(5)]
    b = [gossip_pairing(8, r, seed=1, topology="random") for r in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({tuple(x) for x in a}) > 1
    assert not np.array_equal(a[0], gossip_pairing(8, 0, seed=2, topology="random"))


def test_ring_alternates_between_even_and_odd_edges():
    assert gossip_pairing(4, 0, 0, "ring").tolist() == [1, 0, 3, 2]
    assert gossip_pairing(4, 1, 0, "ring").tolist() == [3, 2, 1, 0]
    assert gossip_pairing(5, 1, 0, "ring").tolist() == [-1, 2, 1, 4, 3]


@pytest.mark.parametrize("topology", ["random", "ring"])
def test_gossip_preserves_the_mean_of_the_workers(topology):
    workers = grads(6, size=40)
    mean_before = np.mean(workers, axis=0)
    for r in range(5):
        peer = gossip_pairing(6, r, seed=0, topology=topology)
        sent = [w.copy() for w in workers]  # what each worker put in the store
        for i, j in enumerate(peer):
            if j >= 0:
                pairwise_average(workers[i], sent[j])
        np.testing.assert_allclose(np.mean(workers, axis=0), mean_before, rtol=1e-5, atol=1e-6)
    # ... while pulling the workers together.
    assert np.var(workers, axis=0).mean() < np.var(grads(6, size=40), axis=0).mean()


def test_pairwise_average():
    a, b = grads(2, size=10)
    np.testing.assert_allclose(pairwise_average(a.copy(), b), (a + b) / 2, rtol=1e-6)


# --- gossip with --agg-prob ---

def pairs(peer: np.ndarray) -> set[tuple[int, int]]:
    return {(i, int(j)) for i, j in enumerate(peer) if i < j}


@pytest.mark.parametrize("n", [2, 3, 8])
def test_agg_prob_one_is_the_pairing_without_it(n):
    """Runs without --agg-prob draw the matchings they always drew: a random permutation from
    (seed, round) paired off in order, or the ring's alternating edges."""
    for r in range(6):
        order = np.random.default_rng([7, r]).permutation(n)
        matching = np.full(n, -1)
        for i, j in zip(order[0::2], order[1::2]):
            matching[i], matching[j] = j, i
        assert gossip_pairing(n, r, 7, "random", agg_prob=1.0).tolist() == matching.tolist()
        assert gossip_pairing(n, r, 7, "random").tolist() == matching.tolist()
        assert gossip_pairing(n, r, 7, "ring", agg_prob=1.0).tolist() == gossip_pairing(n, r, 7, "ring").tolist()
    assert gossip_pairing(4, 1, 0, "ring", agg_prob=1.0).tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("topology", ["random", "ring"])
def test_agg_prob_drops_pairs_of_the_same_matching(topology):
    """A pair that does not exchange gets -1 for both; the others are the pairs the round had anyway,
    and a pair kept at some probability is kept at every higher one (one draw per pair)."""
    for r in range(20):
        full = pairs(gossip_pairing(7, r, 3, topology))
        kept = [pairs(gossip_pairing(7, r, 3, topology, agg_prob=p)) for p in (0.2, 0.5, 0.8, 1.0)]
        for peer in (gossip_pairing(7, r, 3, topology, agg_prob=p) for p in (0.2, 0.5)):
            assert is_matching(peer)
        assert kept[0] <= kept[1] <= kept[2] <= kept[3] == full


def test_small_agg_prob_skips_most_pairs():
    rounds = [gossip_pairing(8, r, seed=1, topology="random", agg_prob=0.1) for r in range(400)]
    exchanged = sum(len(pairs(peer)) for peer in rounds) / (400 * 4)
    assert 0.06 < exchanged < 0.14, exchanged
    # Whole rounds go by with no exchange at all, which the strategy does not count as one.
    assert sum((peer < 0).all() for peer in rounds) > 200
    half = [gossip_pairing(8, r, seed=1, topology="random", agg_prob=0.5) for r in range(400)]
    assert 0.45 < sum(len(pairs(peer)) for peer in half) / (400 * 4) < 0.55


def test_agg_prob_draws_are_seeded_per_round():
    """The generator's draw and a resumed run's are the same: they depend on (seed, round) only."""
    def draws(seed):
        return [gossip_pairing(6, r, seed, "ring", agg_prob=0.5).tolist() for r in range(12)]

    assert draws(4) == draws(4)
    assert len({tuple(d) for d in draws(4)}) > 2  # the skips change from round to round
    assert draws(4) != draws(5)  # the ring is the same for every seed: the skips are not


# --- elastic gossip ---

@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5])
def test_elastic_exchange_preserves_the_pair_mean(alpha):
    a, b = grads(2, size=50, seed=4)
    mean_before = (a + b) / 2
    a_new = elastic_exchange(a.copy(), b, alpha)  # each from the values both had before
    b_new = elastic_exchange(b.copy(), a, alpha)
    np.testing.assert_allclose((a_new + b_new) / 2, mean_before, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a_new, a - alpha * (a - b), rtol=1e-5, atol=1e-6)
    # The gap shrinks by 1 - 2 alpha.
    np.testing.assert_allclose(a_new - b_new, (1 - 2 * alpha) * (a - b), rtol=1e-4, atol=1e-5)


def test_elastic_exchange_at_one_half_is_the_pairwise_average():
    a, b = grads(2, size=50, seed=5)
    np.testing.assert_allclose(elastic_exchange(a.copy(), b, 0.5), pairwise_average(a.copy(), b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("agg_prob", [1.0, 0.5])
def test_elastic_gossip_preserves_the_mean_of_the_workers(agg_prob):
    workers = grads(6, size=40)
    mean_before = np.mean(workers, axis=0)
    for r in range(8):
        peer = gossip_pairing(6, r, seed=0, topology="random", agg_prob=agg_prob)
        sent = [w.copy() for w in workers]
        for i, j in enumerate(peer):
            if j >= 0:
                elastic_exchange(workers[i], sent[j], 0.25)
        np.testing.assert_allclose(np.mean(workers, axis=0), mean_before, rtol=1e-5, atol=1e-6)
    assert np.var(workers, axis=0).mean() < np.var(grads(6, size=40), axis=0).mean()


# --- async ---

def test_staleness_weight_keeps_or_drops():
    assert staleness_weight(0, None) == staleness_weight(100, None) == 1.0
    assert staleness_weight(2, 2) == 1.0
    assert staleness_weight(3, 2) == 0.0
    assert staleness_weight(0, 0) == 1.0
    with pytest.raises(ValueError):
        staleness_weight(-1, 2)


def test_the_pseudo_gradient_is_the_parent_minus_the_workers_mean():
    parent, workers = grads(1, seed=1)[0], grads(3, seed=2)
    out = np.empty_like(parent)
    assert pseudo_gradient(parent, workers, out) is out
    np.testing.assert_allclose(out, parent - np.mean(workers, axis=0), rtol=1e-5, atol=1e-6)


def test_diloco_steps_the_parent_with_nesterov_momentum():
    """buf = m buf + g; parent -= lr (g + m buf): DiLoCo's outer SGD, and plain SGD without momentum."""
    p = torch.nn.Parameter(torch.zeros(10))
    outer = DILOCO.make_parent_optimizer(SimpleNamespace(outer_lr=0.7, outer_momentum=0.9), [p])
    expected, buf = np.zeros(10, np.float32), None
    for g in grads(3, seed=3):
        p.grad = torch.from_numpy(g)
        outer.step()
        buf = g if buf is None else np.float32(0.9) * buf + g
        expected -= np.float32(0.7) * (g + np.float32(0.9) * buf)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    q = torch.nn.Parameter(torch.ones(10))
    plain = DILOCO.make_parent_optimizer(SimpleNamespace(outer_lr=1.0, outer_momentum=0.0), [q])
    q.grad = torch.full((10,), 0.25)
    plain.step()
    assert torch.equal(q.detach(), torch.full((10,), 0.75))  # outer lr 1, no momentum: param-avg's parent

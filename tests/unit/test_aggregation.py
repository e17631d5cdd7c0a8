import numpy as np
import pytest

from libe_cnn.strategies.async_ import staleness_weight
from libe_cnn.strategies.base import average_parameters
from libe_cnn.strategies.base import reduce_in_order as reduce_gradients
from libe_cnn.strategies.easgd import elastic_center_update, elastic_pull
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


# --- async ---

def test_staleness_weight_keeps_or_drops():
    assert staleness_weight(0, None) == staleness_weight(100, None) == 1.0
    assert staleness_weight(2, 2) == 1.0
    assert staleness_weight(3, 2) == 0.0
    assert staleness_weight(0, 0) == 1.0
    with pytest.raises(ValueError):
        staleness_weight(-1, 2)

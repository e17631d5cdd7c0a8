import numpy as np
import pytest

from gen_funcs.reduce import reduce_gradients


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
    with pytest.raises(ValueError, match="no gradients"):
        reduce_gradients([], np.empty(3, np.float32))
    with pytest.raises(ValueError, match="does not match"):
        reduce_gradients(grads(2, size=4), np.empty(3, np.float32))
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_gradients(grads(2), np.empty(10, np.float32), "max")

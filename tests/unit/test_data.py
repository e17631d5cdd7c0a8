import numpy as np
import pytest
import torch

from libe_cnn.errors import UserError
from mnist import data
from tests.conftest import write_idx


@pytest.mark.parametrize("n_samples, n_shards", [(100, 1), (100, 2), (100, 3), (60000, 4), (7, 7)])
def test_shards_are_disjoint_even_and_cover(n_samples, n_shards):
    shards = [data.shard_indices(n_samples, n_shards, s, seed=3) for s in range(n_shards)]
    sizes = {len(s) for s in shards}
    assert sizes == {n_samples // n_shards}
    union = np.concatenate(shards)
    assert len(np.unique(union)) == len(union)  # disjoint
    assert len(union) == n_samples - n_samples % n_shards  # covers all but the remainder
    assert union.min() >= 0 and union.max() < n_samples


def test_shards_depend_on_seed_and_are_reproducible():
    a = data.shard_indices(1000, 2, 0, seed=1)
    assert np.array_equal(a, data.shard_indices(1000, 2, 0, seed=1))
    assert not np.array_equal(a, data.shard_indices(1000, 2, 0, seed=2))


def test_shard_out_of_range():
    with pytest.raises(ValueError):
        data.shard_indices(10, 2, 2, seed=0)


def test_epoch_order_reshuffles_every_epoch():
    e0, e1 = data.epoch_order(500, 1, 0, 0), data.epoch_order(500, 1, 0, 1)
    assert sorted(e0) == list(range(500)) and sorted(e1) == list(range(500))
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e0, data.epoch_order(500, 1, 0, 0))
    assert not np.array_equal(e0, data.epoch_order(500, 1, 1, 0))  # shards shuffle differently


def test_steps_per_epoch():
    assert data.steps_per_epoch(60000, 2, 64) == 468
    assert data.steps_per_epoch(100, 3, 40) == 0


def test_locate_and_load_from_data_dir(tiny_dataset):
    files = data.locate("fashion-mnist", tiny_dataset, download=False)
    x, y = data.load_split(files, train=True)
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [i % 10 for i in range(100)]
    xt, _ = data.load_split(files, train=False, limit=5)
    assert xt.shape == (5, 1, 28, 28)


def test_load_shard_is_the_shard_of_the_full_set(tiny_dataset):
    files = data.locate("fashion-mnist", tiny_dataset, download=False)
    x, y = data.load_split(files, train=True, limit=90)
    for shard in range(3):
        xs, ys = data.load_shard(files, 90, 3, shard, seed=4)
        idx = torch.from_numpy(data.shard_indices(90, 3, shard, seed=4))
        assert torch.equal(xs, x[idx]) and torch.equal(ys, y[idx])


def test_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"mnist not found in .*MNIST/raw"):
        data.locate("mnist", tmp_path, download=False)


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(UserError, match="bad magic"):
        data.read_idx(path)


def test_truncated_file(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((10, 28, 28)))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        data.read_idx(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(UserError, match="cannot read"):
        data.read_idx(path)

import numpy as np
import pytest
import torch

from libe_cnn.errors import UserError
from mnist import data
from tests.conftest import write_cifar10, write_idx, write_iris_csv


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


def test_cifar10_loader_reads_the_binary_records(tmp_path):
    data_dir = write_cifar10(tmp_path / "data", per_batch=12, test=7)
    files = data.locate("cifar10", data_dir, download=False)
    x, y = data.load_split(files, train=True)
    assert x.shape == (60, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [i % 10 for i in range(12)] * 5
    raw = np.frombuffer((data_dir / "cifar-10-batches-bin" / "data_batch_1.bin").read_bytes(), np.uint8)
    green_first_pixel = raw[1 + 1024] / 255.0  # label byte, then 1024 red, then green
    mean, std = data.NORMALIZATION["cifar10"]
    assert x[0, 1, 0, 0].item() == pytest.approx((green_first_pixel - mean[1]) / std[1], abs=1e-6)
    xt, yt = data.load_split(files, train=False)
    assert xt.shape == (7, 3, 32, 32) and len(yt) == 7
    xs, ys = data.load_shard(files, 60, 2, 1, seed=3)
    idx = torch.from_numpy(data.shard_indices(60, 2, 1, seed=3))
    assert torch.equal(xs, x[idx]) and torch.equal(ys, y[idx])


def test_cifar10_damage_is_named(tmp_path):
    data_dir = write_cifar10(tmp_path / "data", per_batch=3, test=3)
    path = data_dir / "cifar-10-batches-bin" / "test_batch.bin"
    records = bytearray(path.read_bytes())
    records[0] = 42
    path.write_bytes(bytes(records))
    with pytest.raises(UserError, match="label 42 is not a class"):
        data.read_cifar10(path)
    path.write_bytes(bytes(records[:-1]))
    with pytest.raises(UserError, match="truncated"):
        data.read_cifar10(path)
    path.unlink()
    with pytest.raises(UserError, match="cifar10 not found in .*cifar-10-batches-bin"):
        data.locate("cifar10", data_dir, download=False)


def test_iris_split_is_fixed_stratified_and_disjoint(tmp_path):
    rows = np.array([[5 + i / 10, 3, 1 + c, 0.2 * c, c] for c in range(3) for i in range(20)])
    write_iris_csv(tmp_path / "data" / "iris" / "iris.csv", rows)
    files = data.locate("iris", tmp_path / "data")
    assert files.paths["csv"] == str(tmp_path / "data" / "iris" / "iris.csv")  # data_dir first
    train_x, train_y = data.load_split(files, train=True)
    test_x, test_y = data.load_split(files, train=False)
    assert train_x.shape == (48, 4) and test_x.shape == (12, 4)
    assert np.bincount(test_y.numpy()).tolist() == [4, 4, 4]  # a fifth of each class
    raw_train, _ = data.read_split(files, train=True)
    raw_test, _ = data.read_split(files, train=False)
    both = {tuple(r) for r in raw_train} | {tuple(r) for r in raw_test}
    assert len(both) == 60  # every flower in exactly one split
    mean, std = data.NORMALIZATION["iris"]
    assert train_x[0, 2].item() == pytest.approx((raw_train[0, 2] - mean[2]) / std[2], rel=1e-5)


def test_iris_from_scikit_learn_is_the_real_set():
    files = data.locate("iris", "no-such-dir")
    x, y = data.load_split(files, train=True)
    xt, yt = data.load_split(files, train=False)
    assert (len(y), len(yt)) == (120, 30) and np.bincount(yt.numpy()).tolist() == [10, 10, 10]
    assert abs(float(torch.cat([x, xt]).mean())) < 0.01  # the normalization fits the data


def test_damaged_iris_csv(tmp_path):
    path = write_iris_csv(tmp_path / "iris.csv", np.array([[5.1, 3.5, 1.4, 0.2, 0]] * 5))
    path.write_text(path.read_text().replace("5,4,", "6,4,", 1))
    with pytest.raises(UserError, match="header says 6 rows"):
        data.read_iris(path)
    path.write_text("5,4,a,b,c\n" + "5.1,3.5,1.4,0.2,7\n" * 5)
    with pytest.raises(UserError, match="class numbers must be 0-2"):
        data.read_iris(path)

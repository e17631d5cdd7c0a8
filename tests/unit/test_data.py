import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from libe_cnn.errors import UserError
from libe_cnn.plan import DatasetFiles, steps_per_epoch
from mnist.data import check_dataset
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


# --- the reproducibility recipe: batch positions and dropout seeds ---

@pytest.mark.parametrize("shard_size, batch", [(500, 50), (500, 64), (37, 37), (10, 1)])
def test_each_epoch_visits_every_used_sample_once_in_epoch_order(shard_size, batch):
    per_epoch = shard_size // batch
    order = data.BatchOrder(shard_size, 4, 1, per_epoch, batch)
    epochs = []
    for epoch in range(3):
        batches = [order.positions(epoch * per_epoch + b).copy() for b in range(per_epoch)]
        assert {len(b) for b in batches} == {batch}
        visited = np.concatenate(batches)
        assert len(np.unique(visited)) == per_epoch * batch  # no sample twice within an epoch
        assert visited.min() >= 0 and visited.max() < shard_size
        # ... and they are the epoch's order cut into consecutive batches (the rest left out)
        assert np.array_equal(visited, data.epoch_order(shard_size, 4, 1, epoch)[: per_epoch * batch])
        epochs.append(visited)
    if per_epoch * batch == shard_size:
        assert all(sorted(e) == list(range(shard_size)) for e in epochs)  # every sample, exactly once
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch reshuffles


def test_batch_positions_are_the_old_recipe():
    """Bit-for-bit what the trainer, baselines and tests computed before the recipe moved here."""
    shard_size, seed, shard, batch = 1000, 7, 2, 33
    per_epoch = shard_size // batch
    order = data.BatchOrder(shard_size, seed, shard, per_epoch, batch)
    for step in range(3 * per_epoch + 2):
        epoch, b = divmod(step, per_epoch)
        old = data.epoch_order(shard_size, seed, shard, epoch)[b * batch : (b + 1) * batch]
        assert np.array_equal(order.positions(step), old)
        assert np.array_equal(data.batch_positions(shard_size, seed, shard, step, per_epoch, batch), old)


def test_a_resumed_step_gives_the_same_positions_as_an_uninterrupted_run():
    args = (900, 3, 1, 900 // 64, 64)
    uninterrupted = [data.BatchOrder(*args).positions(t).copy() for t in range(40)]
    for resume_at in (0, 5, 14, 15, 29):  # mid-epoch and on epoch boundaries (14 steps per epoch)
        resumed = data.BatchOrder(*args)
        for t in range(resume_at, 40):
            assert np.array_equal(resumed.positions(t), uninterrupted[t])
            assert np.array_equal(data.batch_positions(900, 3, 1, t, 900 // 64, 64), uninterrupted[t])
    # Out of order too: the cache holds one epoch, and going back redraws the older one.
    order = data.BatchOrder(*args)
    for t in (30, 2, 16, 2, 39):
        assert np.array_equal(order.positions(t), uninterrupted[t])


def test_batch_positions_differ_between_shards_and_seeds():
    a = data.batch_positions(500, 1, 0, 3, 10, 50)
    assert not np.array_equal(a, data.batch_positions(500, 1, 1, 3, 10, 50))
    assert not np.array_equal(a, data.batch_positions(500, 2, 0, 3, 10, 50))


@pytest.mark.parametrize("shard_size, per_epoch, batch", [(100, 0, 10), (100, 11, 10), (100, 5, 0)])
def test_batch_order_refuses_batches_that_do_not_fit(shard_size, per_epoch, batch):
    with pytest.raises(ValueError):
        data.BatchOrder(shard_size, 1, 0, per_epoch, batch)


def test_batch_order_refuses_a_negative_step():
    with pytest.raises(ValueError):
        data.BatchOrder(100, 1, 0, 10, 10).positions(-1)


def test_dropout_seed_is_the_old_formula_and_differs_across_shards_and_batches():
    for seed, shard, batch in [(1, 0, 0), (5, 3, 17), (123, 7, 999_999)]:
        assert data.dropout_seed(seed, shard, batch) == (seed * 1_000_003 + shard) * 1_000_003 + batch
    seeds = {data.dropout_seed(2, shard, batch) for shard in range(8) for batch in range(1000)}
    assert len(seeds) == 8 * 1000
    assert data.dropout_seed(1, 0, 0) != data.dropout_seed(2, 0, 0)
    torch.manual_seed(data.dropout_seed(9, 1, 40))  # a valid torch seed


def test_steps_per_epoch():
    assert steps_per_epoch(60000, 2, 64) == 468
    assert steps_per_epoch(100, 3, 40) == 0


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
    with pytest.raises(UserError, match=r"test_batch.bin is corrupt: label 42 at position 0 is not a class 0-9"):
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


def test_the_shipped_iris_is_the_real_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data/iris/iris.csv: the default search falls back to the shipped copy
    files = data.locate("iris", None)
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
    with pytest.raises(UserError, match="iris.csv is corrupt: label 7 at position 0 is not a class 0-2"):
        data.read_iris(path)


# A. Labels are checked at load, naming the file.

@pytest.mark.parametrize("split, stem, gz", [("train", "train-labels-idx1-ubyte", True),
                                             ("test", "t10k-labels-idx1-ubyte", False)])
@pytest.mark.parametrize("bad_label", [250, 10], ids=["the-reported-byte", "one-past-the-last-class"])
def test_bad_idx_label_is_named_at_load(tiny_dataset, split, stem, gz, bad_label):
    raw = tiny_dataset / "FashionMNIST" / "raw"
    n = 100 if split == "train" else 20
    labels = np.arange(n) % 10
    labels[17] = bad_label
    write_idx(raw / stem, labels, gz=gz)
    files = data.locate("fashion-mnist", tiny_dataset, download=False)
    name = stem + (".gz" if gz else "")
    expected = f"/{name} is corrupt: label {bad_label} at position 17 is not a class 0-9"
    with pytest.raises(UserError, match=re.escape(expected) + "$"):
        check_dataset(files)  # what the manager runs before any worker starts


def test_images_given_as_labels_is_named(tiny_dataset):
    raw = tiny_dataset / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros((20, 28, 28)))
    files = data.locate("fashion-mnist", tiny_dataset, download=False)
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte is not a labels file"):
        data.read_split(files, train=False)


# B. An explicit data_dir is the only place looked; None is the default search.

@pytest.fixture
def system_copy(tiny_dataset, monkeypatch):
    """tiny_dataset's files standing in for Debian's package, and an empty working directory."""
    system = tiny_dataset / "FashionMNIST" / "raw"
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", [system])
    cwd = tiny_dataset.parent / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return system


def test_explicit_data_dir_does_not_fall_back_to_the_system_copy(tmp_path, system_copy):
    empty = tmp_path / "nonexistent"
    with pytest.raises(UserError) as caught:
        data.locate("fashion-mnist", empty, download=False)
    message = str(caught.value)
    assert message.startswith(f"fashion-mnist not found in {empty}/FashionMNIST/raw "), message
    assert f"(a copy is installed in {system_copy}: leave out --data-dir to use it)" in message


def test_default_search_is_data_then_the_system_copy(system_copy):
    files = data.locate("fashion-mnist", None, download=False)
    assert files.paths["train_images"] == str(system_copy / "train-images-idx3-ubyte.gz")
    local = Path.cwd() / "data" / "FashionMNIST" / "raw"
    local.mkdir(parents=True)
    for path in system_copy.iterdir():
        (local / path.name).write_bytes(path.read_bytes())
    files = data.locate("fashion-mnist", None, download=False)
    assert files.paths["train_images"] == str(local / "train-images-idx3-ubyte.gz")  # absolute, under the cwd
    assert DatasetFiles(**dataclasses.asdict(files)) == files  # as libEnsemble carries it


def test_default_search_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", [tmp_path / "system"])
    monkeypatch.chdir(tmp_path)
    expected = f"not found in {tmp_path}/data/FashionMNIST/raw nor in {tmp_path}/system "
    with pytest.raises(UserError, match=re.escape(expected)):
        data.locate("fashion-mnist", None, download=False)


def test_explicit_data_dir_does_not_fall_back_to_the_shipped_iris(tmp_path):
    expected = re.escape(f"iris not found in {tmp_path}/iris/iris.csv: ") + ".*leave out --data-dir"
    with pytest.raises(UserError, match=expected):
        data.locate("iris", tmp_path)


# C. A failed download says why and leaves no empty folders behind (no internet needed:
# the mirror is a local port that refuses at once).

REFUSING = "http://127.0.0.1:9/"


@pytest.fixture
def offline(monkeypatch):
    """Downloads go straight to REFUSING, whatever proxy the environment names."""
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [REFUSING])
    monkeypatch.setattr(data, "CIFAR10_URL", REFUSING + "cifar-10-binary.tar.gz")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_failed_download_says_why_and_cleans_up(tmp_path, offline, capsys, name):
    target = tmp_path / "d" / "e"
    with pytest.raises(UserError) as caught:
        data.locate(name, target)
    message = str(caught.value)
    reason = message.split("could not be downloaded (", 1)[1].split("): ", 1)[0]
    assert "Connection refused" in reason and "\n" not in message, message
    assert not (tmp_path / "d").exists()  # every folder the download created, and only those
    assert capsys.readouterr().out == ""


def test_failed_download_keeps_what_existed(tmp_path, offline):
    existing = tmp_path / "d"
    (existing / "MNIST").mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="Connection refused"):
        data.locate("mnist", existing)
    assert sorted(p.name for p in existing.iterdir()) == ["MNIST", "keep.txt"]  # MNIST existed: kept
    assert not (existing / "MNIST" / "raw").exists()


def test_reason_is_the_last_mirrors_error():
    error = RuntimeError("Error downloading x.gz:\nTried http://a/, got:\nfirst\nTried http://b/, got:\nsecond\n")
    assert data._reason(error) == "second"
    assert data._reason(PermissionError(13, "Permission denied")) == "[Errno 13] Permission denied"
    assert data._reason(RuntimeError()) == "RuntimeError"


def test_download_prints_reach_the_terminal_only_on_success(tmp_path, capsys):
    def failing() -> None:
        print("Downloading http://a/x.gz")
        raise RuntimeError("Error downloading x.gz:\nTried http://a/, got:\nrefused\n")

    assert data._attempt_download(failing, tmp_path / "x") == "refused"
    assert capsys.readouterr().out == ""
    assert data._attempt_download(lambda: print("Downloading http://a/x.gz"), tmp_path / "x") == ""
    assert capsys.readouterr().out == "Downloading http://a/x.gz\n"

"""The datasets as tensors, their even shards, and which batches and dropout seeds each step uses.

    mnist, fashion-mnist  IDX files (optionally gzipped) in torchvision's raw layout
    cifar10               CIFAR-10's binary version: 3073-byte records (label, then the
                          red, green and blue 32 x 32 planes); no pickle to read
    iris                  a small CSV (150 flowers, 4 measurements); a copy ships inside this
                          package (mnist/iris.csv, with its source and licence)

Each set is read once into memory as a tensor and indexed from there: a per-sample
DataLoader with PIL transforms costs more than the model itself on these networks.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from libe_cnn.errors import UserError
from libe_cnn.plan import DatasetFiles

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Folder names torchvision uses under <root> for the IDX datasets.
TORCHVISION_NAME = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# Classes of the image datasets (iris names its classes in its CSV header).
NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}
# Mean and std of each channel (images) or feature (iris) over the training data.
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "iris": ((5.8433, 3.0573, 3.7580, 1.1993), (0.8253, 0.4344, 1.7594, 0.7597)),
}
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_RECORD = 1 + 3 * 32 * 32
# Iris has no official split: a fixed fifth of each species is the test set, the same
# whatever --seed is, so that runs with different seeds are tested on the same flowers.
IRIS_TEST_FRACTION = 0.2
IRIS_SPLIT_SEED = 1936  # the year Fisher published the data
# Where Debian's dataset-fashion-mnist package installs the real files.
SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}
# Iris is small enough to travel with the code, so it needs neither a download nor another package.
SHIPPED_IRIS = Path(__file__).with_name("iris.csv")
# The dataset root when none is given, relative to the working directory.
DEFAULT_DATA_DIR = Path("data")

_IDX_DTYPE = {0x08: np.uint8}


def _find_in(directory: Path) -> dict[str, str] | None:
    found = {}
    for key, stem in FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = str(candidate)
                break
        else:
            return None
    return found


def locate(name: str, data_dir: str | Path | None, download: bool = True) -> DatasetFiles:
    """Find a dataset's files (their paths are absolute).

    data_dir None: DEFAULT_DATA_DIR, then the system copies (SYSTEM_DIRS; iris: SHIPPED_IRIS),
    then a download into DEFAULT_DATA_DIR. An explicit data_dir: there only, then a download
    into it, so that a run never reads files other than the ones it was pointed at.

    Raises:
        UserError: naming where the files were looked for and what to do.
    """
    explicit = data_dir is not None
    root = Path(data_dir if explicit else DEFAULT_DATA_DIR).absolute()
    if name == "cifar10":
        return _locate_cifar10(root, download)
    if name == "iris":
        return _locate_iris(root, system=not explicit)
    raw_dir = root / TORCHVISION_NAME[name] / "raw"
    system_dirs = SYSTEM_DIRS.get(name, [])
    for directory in [raw_dir] if explicit else [raw_dir, *system_dirs]:
        found = _find_in(directory)
        if found:
            return DatasetFiles(name, found)
    if download:
        error = _download(name, root)
        found = _find_in(raw_dir)
        if found:
            return DatasetFiles(name, found)
    else:
        error = "download disabled"
    installed = [str(d) for d in system_dirs if _find_in(d)]
    where = str(raw_dir) if explicit or not system_dirs else f"{raw_dir} nor in {', '.join(map(str, system_dirs))}"
    if explicit and installed:
        hint = f" (a copy is installed in {installed[0]}: leave out --data-dir to use it)"
    elif not explicit and name == "fashion-mnist":
        hint = " (or install Debian's dataset-fashion-mnist)"
    else:
        hint = ""
    # (Not when only looking: available_datasets looks with download=False.)
    others = [other for other in available_datasets(data_dir) if other != name] if download else []
    if others:
        hint += f"; this machine already has {', '.join(others)}: try --dataset {others[0]}"
    raise UserError(f"{name} not found in {where} and could not be downloaded ({error}): "
                    f"put the four IDX files in {raw_dir}, or run where the internet is reachable{hint}")


def available_datasets(data_dir: str | Path | None) -> list[str]:
    """The datasets a run with this --data-dir finds without downloading, in --dataset's order."""
    from libe_cnn.config import DATASETS

    found = []
    for name in DATASETS:
        try:
            locate(name, data_dir, download=False)
        except UserError:
            continue
        found.append(name)
    return found


def _locate_cifar10(data_dir: Path, download: bool) -> DatasetFiles:
    directory = data_dir / CIFAR10_DIR

    def found() -> DatasetFiles | None:
        paths = {f.removesuffix(".bin"): str(directory / f) for f in CIFAR10_FILES}
        return DatasetFiles("cifar10", paths) if all(Path(p).is_file() for p in paths.values()) else None

    files = found()
    if files:
        return files
    error = "download disabled"
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        error = _attempt_download(
            lambda: download_and_extract_archive(CIFAR10_URL, str(data_dir), md5=CIFAR10_MD5), data_dir)
        files = found()
        if files:
            return files
    raise UserError(f"cifar10 not found in {directory} and could not be downloaded ({error}): unpack "
                    f"{CIFAR10_URL} into {data_dir}, or run where the internet is reachable")


def _locate_iris(data_dir: Path, system: bool) -> DatasetFiles:
    """data_dir/iris/iris.csv, else (if system) the copy shipped in this package."""
    candidates = [data_dir / "iris" / "iris.csv"] + ([SHIPPED_IRIS] if system else [])
    for path in candidates:
        if path.is_file():
            return DatasetFiles("iris", {"csv": str(path)})
    if not system:
        raise UserError(f"iris not found in {candidates[0]}: put an iris.csv there (the layout of {SHIPPED_IRIS}), "
                        "or leave out --data-dir to use that shipped copy")
    raise UserError(f"iris not found in {candidates[0]} nor in {SHIPPED_IRIS} (the copy this package ships): "
                    f"reinstall libe-cnn, or put an iris.csv in {candidates[0]}")


def _download(name: str, root: Path) -> str:
    """Download an IDX dataset into root/<Name>/raw with torchvision; the failure's reason, or ""."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    # One construction downloads all four files (its `resources`), whichever split it loads.
    return _attempt_download(lambda: cls(str(root), train=True, download=True), root / TORCHVISION_NAME[name] / "raw")


def _attempt_download(fetch: Callable[[], object], target: Path) -> str:
    """Run a torchvision download into `target`; on failure, the reason in one line, or "" on success.

    A failure leaves nothing behind: the directories the download created on the way to
    `target` are removed if empty, and torchvision's prints are dropped (they would only
    precede the one-line error). On success the prints are passed on.
    """
    created = _missing_dirs(target)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            fetch()
    except Exception as e:  # any failure becomes the caller's one-line message
        _remove_empty(created)
        return _reason(e)
    sys.stdout.write(output.getvalue())
    return ""


def _missing_dirs(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Remove each directory (deepest first) that is empty; rmdir refuses any that is not."""
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _reason(error: Exception) -> str:
    """One line for a download failure.

    torchvision's MNIST raises "Error downloading X:\nTried MIRROR, got:\nREASON\n..." once per
    mirror, so its first line has no reason in it: the last mirror's REASON is the one kept.
    """
    lines = str(error).splitlines()
    tried = [i for i, line in enumerate(lines[:-1]) if line.startswith("Tried ") and line.endswith(", got:")]
    if tried:
        return lines[tried[-1] + 1]
    return next((line for line in lines if line.strip()), type(error).__name__)


def _check_labels(path: str | Path, labels: np.ndarray, n_classes: int) -> None:
    """Fail at load, naming the file, on a label that would only fail at the step that draws it."""
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        raise UserError(f"{path} is corrupt: label {labels[bad[0]]} at position {bad[0]} "
                        f"is not a class 0-{n_classes - 1}")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array, checking its header and length."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if len(data) < 4:
        raise UserError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or dtype_code not in _IDX_DTYPE or not 1 <= ndim <= 4:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise UserError(f"{path} is truncated or corrupt: {len(data) - offset} bytes of data, header says {expected}")
    return np.frombuffer(data, dtype=_IDX_DTYPE[dtype_code], offset=offset).reshape(shape)


def read_cifar10(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary file: images uint8 [N,3,32,32] and labels [N], checked."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not data or len(data) % CIFAR10_RECORD:
        raise UserError(f"{path} is truncated or corrupt: {len(data)} bytes is not a whole number of "
                        f"{CIFAR10_RECORD}-byte CIFAR-10 records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0]
    _check_labels(path, labels, NUM_CLASSES["cifar10"])
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def read_iris(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An iris.csv: `#` comments, a header `rows,features,name,...`, then features and a class number per line."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        n_rows, n_features, *classes = lines[0].split(",")
        rows = np.array([line.split(",") for line in lines[1:]], dtype=np.float64)
        if rows.shape != (int(n_rows), int(n_features) + 1):
            raise ValueError(f"header says {n_rows} rows of {n_features} features and a class, found {rows.shape}")
    except (OSError, UnicodeDecodeError, IndexError, ValueError) as e:
        raise UserError(f"{path} is not a readable iris.csv ({e})") from None
    labels = rows[:, -1].astype(np.int64)
    _check_labels(path, labels, len(classes))
    return rows[:, :-1].astype(np.float32), labels


def iris_test_rows(labels: np.ndarray) -> np.ndarray:
    """Which rows are the test set: a fixed fifth of each class."""
    rng = np.random.default_rng(IRIS_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: round(len(members) * IRIS_TEST_FRACTION)]] = True
    return test


def read_split(files: DatasetFiles, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """One split's raw samples and labels, checked against each other."""
    if files.name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        parts = [read_cifar10(files.paths[name]) for name in names]
        samples, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    elif files.name == "iris":
        samples, labels = read_iris(files.paths["csv"])
        keep = iris_test_rows(labels) != train
        samples, labels = samples[keep], labels[keep]
    else:
        prefix = "train" if train else "test"
        samples = read_idx(files.paths[f"{prefix}_images"])
        labels_path = files.paths[f"{prefix}_labels"]
        labels = read_idx(labels_path)
        if labels.ndim != 1:
            raise UserError(f"{labels_path} is not a labels file: its IDX header has {labels.ndim} dimensions, not 1")
        _check_labels(labels_path, labels, NUM_CLASSES[files.name])
    if len(samples) != len(labels):
        raise UserError(f"{files.name}: {len(samples)} {'train' if train else 'test'} samples but {len(labels)} labels")
    return samples, labels


def load_split(files: DatasetFiles, train: bool, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples normalized as the model takes them (float32) and labels as int64 [N]."""
    samples, labels = read_split(files, train)
    if limit is not None:
        samples, labels = samples[:limit], labels[:limit]
    return normalize(samples, files.name), torch.from_numpy(labels.astype(np.int64))


def normalize(samples: np.ndarray, name: str) -> torch.Tensor:
    """Zero mean and unit spread per channel (images, scaled from 0-255 first) or per feature."""
    x = torch.from_numpy(samples.astype(np.float32))
    if samples.dtype == np.uint8:
        x.div_(255.0)
    if x.ndim == 3:  # [N, H, W]: one channel
        x = x.unsqueeze(1)
    shape = (1, -1) + (1,) * (x.ndim - 2)  # broadcast over the channel (or feature) axis
    mean, std = (torch.tensor(v).view(shape) for v in NORMALIZATION[name])
    return x.sub_(mean).div_(std)


def shard_indices(n_samples: int, n_shards: int, shard: int, seed: int) -> np.ndarray:
    """Indices of one of `n_shards` disjoint, equal-size shards of a seeded permutation.

    Each shard holds n_samples // n_shards samples; the remainder is left out so that
    every worker takes the same number of steps per epoch.
    """
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    size = n_samples // n_shards
    order = np.random.default_rng([seed, 0x5A4D]).permutation(n_samples)
    return np.sort(order[shard * size : (shard + 1) * size])


# --- The reproducibility recipe ------------------------------------------------------------
# What a worker computes at its batch number `step` (counted from the start of training, not
# from the start of the epoch) depends on (seed, shard, step) only: which samples it takes
# (batch_positions / BatchOrder, from epoch_order) and which dropout masks it draws
# (dropout_seed). A resumed run therefore repeats an uninterrupted one exactly. The trainer,
# mnist/nn.py, the benchmarks and the tests take their batches from here, and the trainer and
# benchmarks/batch_scaling.py their dropout seeds: changing either changes every run's numbers.


def epoch_order(shard_size: int, seed: int, shard: int, epoch: int) -> np.ndarray:
    """The order in which one shard's samples are visited in one epoch (positions in the shard)."""
    return np.random.default_rng([seed, shard, epoch]).permutation(shard_size)


class BatchOrder:
    """One worker's batches, in order: `positions(step)` of its batch number `step`.

    Epoch e is epoch_order(..., e) cut into steps_per_epoch consecutive batches of batch_size;
    the last shard_size - steps_per_epoch * batch_size positions of that order go unused.
    Only the current epoch's order is kept: it costs ~0.3 ms to draw for 30,000 samples,
    which per-step callers should not pay at every step.
    """

    def __init__(self, shard_size: int, seed: int, shard: int, steps_per_epoch: int, batch_size: int) -> None:
        if batch_size < 1 or steps_per_epoch < 1 or steps_per_epoch * batch_size > shard_size:
            raise ValueError(f"{steps_per_epoch} steps of {batch_size} samples do not fit in one epoch "
                             f"of a {shard_size}-sample shard")
        self.shard_size, self.seed, self.shard = shard_size, seed, shard
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def positions(self, step: int) -> np.ndarray:
        """Positions in the shard of the batch number `step`: batch_size of them, a view not to write to."""
        if step < 0:
            raise ValueError(f"batch number {step} is negative")
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = epoch_order(self.shard_size, self.seed, self.shard, epoch)
            self._epoch = epoch
        return self._order[b * self.batch_size : (b + 1) * self.batch_size]


def batch_positions(shard_size: int, seed: int, shard: int, step: int, steps_per_epoch: int,
                    batch_size: int) -> np.ndarray:
    """BatchOrder(...).positions(step) without the cache: for callers that want one batch."""
    return BatchOrder(shard_size, seed, shard, steps_per_epoch, batch_size).positions(step)


def dropout_seed(seed: int, shard: int, batch: int) -> int:
    """The torch seed set before the forward pass on a worker's batch number `batch`.

    Workers draw different masks, and a resumed run draws the same ones as an uninterrupted one.
    """
    return (seed * 1_000_003 + shard) * 1_000_003 + batch


def check_dataset(files: DatasetFiles) -> int:
    """Read every file once, so a corrupt or truncated one fails here and not in a worker.

    Returns the number of training samples.
    """
    read_split(files, train=False)
    return len(read_split(files, train=True)[1])


def load_shard(files: DatasetFiles, n_train: int, n_shards: int, shard: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Only one worker's shard of the (first n_train) training samples, normalized."""
    samples, labels = read_split(files, train=True)
    idx = shard_indices(n_train, n_shards, shard, seed)
    return normalize(samples[:n_train][idx], files.name), torch.from_numpy(labels[:n_train][idx].astype(np.int64))

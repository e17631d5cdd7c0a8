"""MNIST-style datasets as tensors, their even shards, and the per-epoch batch order.

The files are IDX (optionally gzipped) in torchvision's raw layout. Each set is read once
into memory as a tensor and indexed from there: a per-sample DataLoader with PIL
transforms costs more than the model itself on this CNN.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from libe_cnn.errors import UserError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Folder names torchvision uses under <root>, and per-dataset pixel mean/std.
TORCHVISION_NAME = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
# Where Debian's dataset-fashion-mnist package installs the real files.
SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}

_IDX_DTYPE = {0x08: np.uint8}


@dataclass(frozen=True)
class DatasetFiles:
    name: str
    paths: dict[str, str]  # FILES key -> path of the file (.gz or raw)


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


def locate(name: str, data_dir: str | Path, download: bool = True) -> DatasetFiles:
    """Find a dataset's four IDX files: data_dir, then system packages, then a download.

    Raises:
        UserError: naming where the files were looked for and what to do.
    """
    raw_dir = Path(data_dir) / TORCHVISION_NAME[name] / "raw"
    for directory in [raw_dir, *SYSTEM_DIRS.get(name, [])]:
        found = _find_in(directory)
        if found:
            return DatasetFiles(name, found)
    if download:
        error = _download(name, Path(data_dir))
        found = _find_in(raw_dir)
        if found:
            return DatasetFiles(name, found)
    else:
        error = "download disabled"
    hint = " or install Debian's dataset-fashion-mnist" if name == "fashion-mnist" else ""
    raise UserError(f"{name} not found in {raw_dir} and could not be downloaded ({error}): "
                    f"put the four IDX files there{hint}, or run where the internet is reachable")


def _download(name: str, root: Path) -> str:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
        return ""
    except Exception as e:  # any failure becomes the one-line message of `locate`
        return str(e).splitlines()[0] if str(e) else type(e).__name__


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


def load_split(files: DatasetFiles, train: bool, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as normalized float32 [N,1,28,28] and labels as int64 [N]."""
    prefix = "train" if train else "test"
    images = read_idx(files.paths[f"{prefix}_images"])
    labels = read_idx(files.paths[f"{prefix}_labels"])
    if len(images) != len(labels):
        raise UserError(f"{files.name}: {len(images)} images but {len(labels)} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return normalize(images, files.name), torch.from_numpy(labels.astype(np.int64))


def normalize(images: np.ndarray, name: str) -> torch.Tensor:
    mean, std = NORMALIZATION[name]
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(mean).div_(std)
    return x.unsqueeze(1)


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


def epoch_order(shard_size: int, seed: int, shard: int, epoch: int) -> np.ndarray:
    """The order in which one shard's samples are visited in one epoch (positions in the shard)."""
    return np.random.default_rng([seed, shard, epoch]).permutation(shard_size)


def steps_per_epoch(n_train: int, n_workers: int, batch_size: int) -> int:
    """Optimizer steps per epoch: every worker takes full batches from its shard."""
    return (n_train // n_workers) // batch_size


def batch_positions(shard_size: int, batch_size: int, seed: int, shard: int, step: int) -> tuple[int, np.ndarray]:
    """Epoch and shard positions of the batch a worker trains on at a global step."""
    per_epoch = shard_size // batch_size
    epoch, b = divmod(step, per_epoch)
    order = epoch_order(shard_size, seed, shard, epoch)
    return epoch, order[b * batch_size : (b + 1) * batch_size]


def load_shard(files: DatasetFiles, n_train: int, n_shards: int, shard: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Only one worker's shard of the (first n_train) training samples, normalized."""
    images = read_idx(files.paths["train_images"])[:n_train]
    labels = read_idx(files.paths["train_labels"])[:n_train]
    idx = shard_indices(n_train, n_shards, shard, seed)
    return normalize(images[idx], files.name), torch.from_numpy(labels[idx].astype(np.int64))

"""Shared fixtures: a real redis-server and the real Fashion-MNIST files."""

from __future__ import annotations

import contextlib
import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_address():
    """A real redis-server on loopback with a password, stopped after the session."""
    from libe_cnn.redis_server import PrivateRedis

    server = PrivateRedis()
    address = server.start()
    yield address
    server.stop()


@pytest.fixture(scope="session")
def second_redis():
    """Another real redis-server, for runs that spread their data over two."""
    from libe_cnn.redis_server import PrivateRedis

    server = PrivateRedis()
    address = server.start()
    yield address
    server.stop()


@pytest.fixture(scope="session")
def fashion_files():
    from mnist.data import locate

    # None: the default search, ./data and then the system copy (Debian's dataset-fashion-mnist).
    return locate("fashion-mnist", None, download=False)


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write an IDX file (the format of the MNIST family) for loader tests."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def tiny_dataset(tmp_path):
    """A small MNIST-layout dataset (random pixels, labels 0..9) under tmp_path/data."""
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (100, 28, 28)), gz=True)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(100) % 10, gz=True)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(20) % 10)
    return tmp_path / "data"


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project script with the test interpreter, from the repository root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def call_main(main, args, capsys) -> subprocess.CompletedProcess:
    """A command's main(args) in this process, returned as a subprocess run would be: code and streams."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own exits (errors of the plot command, --help)
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture
def run_main(capsys):
    """run_libe_cnn.py's main() in this process, for what ends before any worker starts.

    A few tests run the same cases as real subprocesses, so the two stay in agreement.
    """
    from run_libe_cnn import main

    return lambda *args: call_main(main, args, capsys)


# Any download is refused at once by a local port: tests never need the internet.
REFUSING_PROXY = "http://127.0.0.1:9"


@pytest.fixture
def offline(monkeypatch):
    """Downloads in this process fail at once, as they would on a machine without internet."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, REFUSING_PROXY)


def write_cifar10(data_dir: Path, per_batch: int, test: int) -> Path:
    """CIFAR-10's binary layout with random images (labels 0..9 in turn) under data_dir."""
    directory = data_dir / "cifar-10-batches-bin"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        count = test if name.startswith("test") else per_batch
        records = rng.integers(0, 256, (count, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(count) % 10
        (directory / name).write_bytes(records.tobytes())
    return data_dir


def write_iris_csv(path: Path, rows: np.ndarray) -> Path:
    """The iris.csv layout (mnist/iris.csv, without its comments): a header, then 4 measurements and a class per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"{len(rows)},4,setosa,versicolor,virginica"
    path.write_text("\n".join([header, *(",".join(f"{v:g}" for v in r[:4]) + f",{int(r[4])}" for r in rows)]) + "\n")
    return path


def shm_leftovers(run_dir: Path) -> list[Path]:
    """The shared-memory directory of the run in run_dir (libe_cnn/shm.py), if it is still there."""
    import json

    from libe_cnn import shm

    run_id = json.loads((Path(run_dir) / "config.json").read_text())["run_id"]
    return list(shm.root().glob(f"{shm.PREFIX}{run_id}"))


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A tmpfs of `size` (mount's -o size=, e.g. 16m) mounted at `where` for the block; root only."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)

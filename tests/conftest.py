"""Shared fixtures: a real redis-server and the real Fashion-MNIST files."""

from __future__ import annotations

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
def fashion_files():
    from mnist.data import locate

    return locate("fashion-mnist", ROOT / "data", download=False)


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

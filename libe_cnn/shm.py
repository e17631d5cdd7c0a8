"""Shared memory between the processes of one host: the run's buffers as files on a tmpfs.

Between processes on the same host the bulk of the exchange (gradients, parameters, worker
states, pipeline activations) need not cross a socket and a single-threaded Redis server:
each buffer is a file in the run's own directory on /dev/shm, written once by its sender and
mapped by its readers, so a reader's array views the sender's pages without a copy. Redis keeps
the small control traffic (the tokens that say a buffer is there, heartbeats).

    /dev/shm/libe-cnn-<run id>/        mode 0700, removed at the run's end (and on Ctrl-C or a failure);
                                       LIBE_CNN_SHM names another tmpfs
        owner                          "<pid> <host>" of the process that owns it (libe_cnn/owned_dirs.py)
        <name>                         one encoded buffer (libe_cnn/codec.py), mode 0600

A file appears under its name only once complete (written beside it, then renamed), so a
reader never sees half a buffer. A run killed outright leaves its directory behind; the next
run on the host removes it (libe_cnn/owned_dirs.py).
"""

from __future__ import annotations

import mmap
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from libe_cnn.owned_dirs import mark_owned

PREFIX = "libe-cnn-"


def root() -> Path:
    """The tmpfs the run's directory goes on: LIBE_CNN_SHM, else /dev/shm."""
    return Path(os.environ.get("LIBE_CNN_SHM") or "/dev/shm")


class RunKey(NamedTuple):
    """A key of the run: `<run id>:<name>`, as on Redis (libe_cnn/store.py's RunKey has the same shape)."""

    redis_key: str


def run_directory(run_id: str) -> Path:
    return root() / f"{PREFIX}{run_id}"


def create(directory: Path) -> Path:
    """Make a run's directory (mode 0700), owned by this process; a leftover of the same run is replaced."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    mark_owned(directory)
    return directory


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def free_bytes() -> int:
    """Bytes free on the tmpfs; 0 where there is none."""
    try:
        return shutil.disk_usage(root()).free
    except OSError:
        return 0


class RunShmConnector:
    """ProxyStore connector for one run's buffers in its shared-memory directory.

    `get` returns a read-only memoryview of the file mapped into memory (the codec decodes a view
    of it); the mapping outlives an `evict`, which only removes the name.
    """

    def __init__(self, directory: str, namespace: str) -> None:
        self.directory = Path(directory)
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"RunShmConnector(directory={str(self.directory)!r}, namespace={self.namespace!r})"

    def close(self) -> None:
        pass  # the directory is the run's, removed at its end

    def config(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "namespace": self.namespace}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RunShmConnector:
        return cls(**config)

    def _path(self, key: RunKey) -> Path:
        namespace, _, name = key.redis_key.partition(":")
        if namespace != self.namespace or not name or "/" in name or name.startswith("."):
            raise KeyError(f"key {key.redis_key!r} does not belong to run {self.namespace!r}")
        return self.directory / name

    def key(self, name: str | None) -> RunKey:
        return RunKey(f"{self.namespace}:{uuid.uuid4().hex if name is None else name}")

    def put(self, obj: bytes | bytearray | memoryview, name: str | None = None) -> RunKey:
        key = self.key(name)
        self.set(key, obj)
        return key

    def set(self, key: RunKey, obj: bytes | bytearray | memoryview) -> None:
        """Write `obj` under `key`: beside it first, then renamed, so no reader sees it half written."""
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(obj).cast("B")
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)

    def set_batch(self, keys: Sequence[RunKey], objs: Sequence[bytes]) -> None:
        for key, obj in zip(keys, objs):
            self.set(key, obj)

    def put_batch(self, objs: Sequence[bytes]) -> list[RunKey]:
        return [self.put(obj) for obj in objs]

    def get(self, key: RunKey) -> memoryview | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            # MAP_POPULATE: the pages are mapped at once, not one fault at a time as they are read.
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return memoryview(mapped)

    def get_batch(self, keys: Sequence[RunKey]) -> list[memoryview | None]:
        return [self.get(k) for k in keys]

    def exists(self, key: RunKey) -> bool:
        return self._path(key).exists()

    def evict(self, key: RunKey) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def evict_batch(self, keys: Sequence[RunKey]) -> None:
        for key in keys:
            self.evict(key)

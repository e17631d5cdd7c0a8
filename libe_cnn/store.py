"""The run's tensor store: ProxyStore's Store on Redis, with run-scoped keys and the raw codec.

ProxyStore's role is small: its Store (no proxies, no cache) encodes and writes every tensor,
and reads or deletes one key at a time, through the connector below. Reads and deletes of
several keys go to the connector directly, as one MGET or DEL: Store 1.1 has no batch get or
evict, and a round trip per key measured +0.13 ms for 2 keys and +0.39 ms for 4 (1 KB arrays;
deleting 4: +0.3 ms), where Store's own layer adds 0.01-0.04 ms to a one-key call.

ProxyStore's stock RedisConnector cannot authenticate (nor use TLS), cannot set the client's read size
and flushes the whole database on close, so the run uses the connector below instead.
Every key starts with the run id, which lets a run delete exactly its own keys at the end
and never touch anyone else's.
"""

from __future__ import annotations

import dataclasses
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from proxystore.serialize import SerializationError
from proxystore.store import Store

from libe_cnn import codec
from libe_cnn.shm import RunKey, RunShmConnector

T = TypeVar("T")

# A 4.8 MB GET took ~11.8 ms with redis-py's default 64 KiB read size and ~2.9 ms with 1 MiB.
SOCKET_READ_SIZE = 1 << 20


def _fast_io() -> dict:
    """Read replies with hiredis (when installed) but write commands with redis-py's own packer.

    hiredis parses a 4.8 MB reply in about half the time, but its command packer copies a
    large value twice into one new buffer, which doubled the time of a 4.8 MB SET; redis-py's
    packer sends a large value as it is.
    """
    # These are redis-py internals: whatever a new release changed in them (a module moved, a
    # signature), its defaults still work, only slower, so a failure here costs a warning.
    try:
        if not redis.utils.HIREDIS_AVAILABLE:
            return {}
        from redis._parsers.encoders import Encoder
        from redis.connection import PythonRespSerializer, _HiredisParser

        packer = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
        packer.pack("SET", "k", b"v")  # a changed packer fails here, not in the middle of a run
        _HiredisParser(socket_read_size=SOCKET_READ_SIZE)
    except Exception as e:
        warnings.warn(f"using redis-py's default reply parser and command packer (slower on large values): "
                      f"its internals changed ({type(e).__name__}: {e})", stacklevel=2)
        return {}
    return {"parser_class": _HiredisParser, "command_packer": packer}


_FAST_IO = _fast_io()


@dataclass(frozen=True)
class RedisAddress:
    """Where the run's Redis server is and how to log in (the fields of a redis:// or rediss:// URL)."""

    host: str
    port: int
    password: str | None = field(default=None, repr=False)
    username: str | None = None  # an ACL user; None: the server's default user
    db: int = 0
    tls: bool = False  # rediss://
    # redis-py's ssl_* options as a URL's query gives them, e.g. {"ssl_ca_certs": "/etc/ca.pem"}:
    # plain strings survive the plan's trips to the workers (pickled, or dumped to dicts by libEnsemble).
    tls_options: dict[str, str] = field(default_factory=dict, hash=False)

    def client(self, **kwargs: Any) -> redis.Redis:
        pool = redis.ConnectionPool(
            connection_class=redis.SSLConnection if self.tls else redis.Connection,
            host=self.host, port=self.port, username=self.username, password=self.password, db=self.db,
            socket_read_size=SOCKET_READ_SIZE,
            # A few quick retries ride out a blip; a dead server or a wrong password is
            # reported in well under a second instead of after redis-py's default backoff.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 3),
            **_FAST_IO,
            **self.typed_tls_options(),
            **kwargs,
        )
        return redis.Redis(connection_pool=pool)

    def typed_tls_options(self) -> dict[str, Any]:
        """tls_options as redis-py's URL parser types them (booleans, numbers, verify flags)."""
        if not self.tls_options:
            return {}
        options = redis.connection.parse_url("rediss://?" + urlencode(self.tls_options))
        del options["connection_class"]
        return options


class RunRedisConnector:
    """ProxyStore connector for one run's keys on an authenticated Redis server."""

    def __init__(self, host: str, port: int, password: str | None, namespace: str, **more: Any) -> None:
        # `more`: the rest of a RedisAddress (username, db, tls...), so that cls(**config()) rebuilds it.
        self.address = RedisAddress(host, port, password, **more)
        self.namespace = namespace
        self.client = self.address.client()

    def __repr__(self) -> str:
        return f"RunRedisConnector(host={self.address.host!r}, port={self.address.port}, namespace={self.namespace!r})"

    def close(self) -> None:
        # Only the connection: keys are owned by the run, which deletes them at its end.
        self.client.close()

    def config(self) -> dict[str, Any]:
        # Store calls it (its repr when created, its config for proxies); ProxyStore rebuilds with cls(**config).
        return {**dataclasses.asdict(self.address), "namespace": self.namespace}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RunRedisConnector:
        # Part of ProxyStore's Connector protocol (the type Store is declared over); the run never calls it.
        return cls(**config)

    def _checked(self, key: RunKey) -> str:
        if not key.redis_key.startswith(self.namespace + ":"):
            raise KeyError(f"key {key.redis_key!r} does not belong to run {self.namespace!r}")
        return key.redis_key

    def put(self, obj: bytes, name: str | None = None) -> RunKey:
        """Store.put(..., name=...) passes `name` here: a key others can predict, else a fresh one."""
        key = RunKey(f"{self.namespace}:{uuid.uuid4().hex if name is None else name}")
        self.client.set(key.redis_key, obj)
        return key

    def set_batch(self, keys: Sequence[RunKey], objs: Sequence[bytes]) -> None:
        """Write each object under its key, in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for key, obj in zip(keys, objs):
                pipe.set(self._checked(key), obj)
            pipe.execute()

    def put_batch(self, objs: Sequence[bytes]) -> list[RunKey]:
        # Part of ProxyStore's Connector protocol (Store.put_batch); the run never calls it.
        keys = [RunKey(f"{self.namespace}:{uuid.uuid4().hex}") for _ in objs]
        self.set_batch(keys, objs)
        return keys

    def get(self, key: RunKey) -> bytes | None:
        return self.client.get(self._checked(key))

    def get_batch(self, keys: Sequence[RunKey]) -> list[bytes | None]:
        # One round trip for all N workers' buffers instead of N.
        return self.client.mget([self._checked(k) for k in keys]) if keys else []

    def exists(self, key: RunKey) -> bool:
        # Part of ProxyStore's Connector protocol (Store.exists); the run never calls it.
        return bool(self.client.exists(self._checked(key)))

    def evict(self, key: RunKey) -> None:
        self.client.delete(self._checked(key))

    def evict_batch(self, keys: Sequence[RunKey]) -> None:
        if keys:
            self.client.delete(*(self._checked(k) for k in keys))


class TensorStore:
    """Puts and gets flat numpy buffers by string key, for libEnsemble rows to carry.

    Buffers go through ProxyStore's Store on the run's Redis or, with `shm_dir` (every process
    on one host), its shared-memory directory (libe_cnn/shm.py): one key through the Store,
    several to the connector's batch calls (on Redis one MGET or DEL: see the module docstring).
    Queues of short tokens on Redis tell a process that a named buffer is there, without polling.
    """

    def __init__(self, address: RedisAddress, run_id: str, shm_dir: str | None = None) -> None:
        self._control = RunRedisConnector(**dataclasses.asdict(address), namespace=run_id)
        self._connector = RunShmConnector(shm_dir, run_id) if shm_dir else self._control
        # No cache: every key is read once, and a cache would keep old buffers alive.
        self._store = Store(
            f"{run_id}-{uuid.uuid4().hex[:8]}",
            self._connector,
            serializer=codec.encode,
            deserializer=codec.decode,
            cache_size=0,
        )

    def put(self, array: np.ndarray, name: str | None = None) -> str:
        """Store `array` under a fresh key, or under `key(name)` for a key others can predict."""
        return self._store.put(array, name=name).redis_key

    def put_many(self, named: Sequence[tuple[str, np.ndarray]]) -> list[str]:
        """Store arrays under `key(name)` for each (name, array), on Redis in one round trip (Store 1.1
        has no batch put under names: the connector does it, with the same codec)."""
        keys = [self.key(name) for name, _ in named]
        self._connector.set_batch([RunKey(k) for k in keys], [codec.encode(array) for _, array in named])
        return keys

    def key(self, name: str) -> str:
        """The full key of a named entry of this run."""
        return f"{self._control.namespace}:{name}"

    def get(self, key: str) -> np.ndarray:
        try:
            array = self._store.get(RunKey(key))
        except SerializationError as e:  # Store wraps the codec's error: pass on the codec's own
            raise codec.CodecError(f"store key {key!r}: {e.__cause__}") from e.__cause__
        if array is None:
            raise KeyError(f"store keys missing: {[key]}")
        return array

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray]:
        if len(keys) == 1:
            return [self.get(keys[0])]
        blobs = self._connector.get_batch([RunKey(k) for k in keys])
        missing = [k for k, b in zip(keys, blobs) if b is None]
        if missing:
            raise KeyError(f"store keys missing: {missing}")
        return [codec.decode(b) for b in blobs]

    def hand_over(self, name: str, array: np.ndarray) -> None:
        """Leave `array` for one reader waiting in `take(name)`: on Redis a list of one (one round
        trip); in shared memory a buffer of its own, whose key the list carries."""
        on_redis = self._connector is self._control
        self._control.client.rpush(self.key(name), codec.encode(array) if on_redis else self.put(array))

    def take(self, name: str, timeout: float) -> np.ndarray | None:
        """The array handed over under `name`, waiting up to `timeout` seconds for it (None:
        not there yet); the entry is gone once taken."""
        popped = self._control.client.blpop([self.key(name)], timeout=timeout)
        if popped is None:
            return None
        if self._connector is self._control:
            return codec.decode(popped[1])
        array = self.get(popped[1].decode())
        self.evict([popped[1].decode()])  # the mapping stays valid; only the name goes
        return array

    def evict(self, keys: Sequence[str]) -> None:
        if len(keys) == 1:
            self._store.evict(RunKey(keys[0]))
        else:
            self._connector.evict_batch([RunKey(k) for k in keys])

    def notify(self, queues: Sequence[str], token: str) -> None:
        """Append `token` to each of the run's named queues (Redis lists), in one round trip."""
        with self._control.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.rpush(self.key(queue), token)
            pipe.execute()

    def next_tokens(self, queue: str, timeout: float, most: int = 256) -> list[str]:
        """The oldest tokens of a named queue: waiting up to `timeout` seconds for one, then
        whatever else is there at once, up to `most` (empty: none came)."""
        client, key = self._control.client, self.key(queue)
        popped = client.blpop([key], timeout=timeout)
        if popped is None:
            return []
        more = client.lpop(key, most - 1) if most > 1 else None
        return [popped[1].decode(), *(t.decode() for t in more or ())]

    def close(self) -> None:
        self._store.close()
        if self._connector is not self._control:
            self._control.close()


def consecutive_homes(n_workers: int, n_servers: int) -> tuple[int, ...]:
    """Each worker's server when one machine runs them all: consecutive workers share one, as
    the workers of one node would."""
    return tuple(shard * n_servers // n_workers for shard in range(n_workers))


class ServerGroup:
    """The run's store servers (one, or one per node), a TensorStore on each.

    Every process writes what it puts to its own worker's home server (the generator to the
    home of the worker the data belongs to), so no one server carries every worker's traffic;
    whoever reads a named entry knows whose it is, hence where it is.
    """

    def __init__(self, addresses: Sequence[RedisAddress], run_id: str, homes: Sequence[int],
                 shm_dir: str | None = None) -> None:
        # In shared memory every server's buffers share the run's one directory; each server keeps its queues.
        self.stores = [TensorStore(a, run_id, shm_dir) for a in addresses]
        self.homes = tuple(homes)  # each shard's server: an index into `addresses`

    def home(self, shard: int) -> TensorStore:
        return self.stores[self.homes[shard]]

    def by_server(self, items: Sequence[tuple[int, T]]) -> list[tuple[TensorStore, list[T]]]:
        """(shard, item) pairs grouped by the shard's home server, each group in the given order."""
        groups: dict[int, list[T]] = {}
        for shard, item in items:
            groups.setdefault(self.homes[shard], []).append(item)
        return [(self.stores[i], group) for i, group in groups.items()]

    def get_many(self, named: Sequence[tuple[int, str]]) -> list[np.ndarray]:
        """The arrays of (shard, name) pairs, each from the shard's home server: one MGET per server."""
        found: dict[tuple[int, str], np.ndarray] = {}
        for store, group in self.by_server([(shard, (shard, name)) for shard, name in named]):
            for item, array in zip(group, store.get_many([store.key(name) for _, name in group])):
                found[item] = array
        return [found[tuple(item)] for item in named]

    def put_many(self, named: Sequence[tuple[int, str, np.ndarray]]) -> None:
        """Put (shard, name, array) triples, each on the shard's home server: one round trip per server."""
        for store, group in self.by_server([(shard, (name, array)) for shard, name, array in named]):
            store.put_many(group)

    def evict(self, keys: Sequence[tuple[TensorStore, str]]) -> None:
        """Delete (store, key) pairs: one round trip per server."""
        for store in self.stores:
            mine = [k for s, k in keys if s is store]
            if mine:
                store.evict(mine)

    def close(self) -> None:
        for store in self.stores:
            store.close()


def run_keys(address: RedisAddress, run_id: str) -> list[str]:
    """All keys of one run still on the server."""
    with address.client() as client:
        return [k.decode() for k in client.scan_iter(match=f"{run_id}:*", count=1000)]


def delete_run_keys(address: RedisAddress, run_id: str) -> int:
    """Delete every key of one run (and nothing else); returns how many were deleted."""
    keys = run_keys(address, run_id)
    if keys:
        with address.client() as client:
            client.delete(*keys)
    return len(keys)


def server_traffic_bytes(address: RedisAddress) -> int:
    """Bytes the server has received plus sent since it started (all clients)."""
    with address.client() as client:
        stats = client.info("stats")
    return int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"])

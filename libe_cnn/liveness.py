"""Worker liveness through the store: each simulator keeps a key with a short TTL alive.

libEnsemble has no heartbeat: a simulator that dies (killed, out of memory, its node lost)
leaves the manager waiting for its row forever. Each simulator refreshes
`<run>:alive:<shard>` every BEAT_S seconds with a TTL of TTL_S; the generator, whenever it
has waited a while for rows, checks that every key is still there. This works the same
under local and MPI comms and across nodes.
"""

from __future__ import annotations

import threading
import time

import redis

from libe_cnn.store import RedisAddress

BEAT_S = 1.0
TTL_S = 10  # a worker silent this long is declared lost
STARTUP_GRACE_S = 180.0  # time a worker may take to start (spawn, import torch, load its shard)


def alive_key(run_id: str, shard: int) -> str:
    return f"{run_id}:alive:{shard}"


class Heartbeat:
    """A daemon thread in a simulator that keeps its liveness key alive until stopped."""

    def __init__(self, address: RedisAddress, run_id: str, shard: int) -> None:
        self._key = alive_key(run_id, shard)
        self._client = address.client(socket_timeout=5)
        self._stop = threading.Event()
        self._client.set(self._key, 1, ex=TTL_S)  # before the first row: the worker is up
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{shard}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self._client.set(self._key, 1, ex=TTL_S)
            except redis.RedisError:
                pass  # the training loop hits the same error and reports it

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._client.delete(self._key)
        except redis.RedisError:
            pass
        self._client.close()


class LivenessCheck:
    """On the generator: which workers have stopped beating."""

    def __init__(self, address: RedisAddress, run_id: str, n_workers: int) -> None:
        self._client = address.client(socket_timeout=5)
        self._keys = [alive_key(run_id, s) for s in range(n_workers)]
        self._seen: set[int] = set()
        self._start = time.monotonic()

    def lost(self) -> list[int]:
        """Shards whose worker was alive and went silent, or never started within the grace time."""
        with self._client.pipeline(transaction=False) as pipe:
            for key in self._keys:
                pipe.exists(key)
            present = pipe.execute()
        lost = []
        late = time.monotonic() - self._start > STARTUP_GRACE_S
        for shard, here in enumerate(present):
            if here:
                self._seen.add(shard)
            elif shard in self._seen or late:
                lost.append(shard)
        return lost

    def close(self) -> None:
        self._client.close()

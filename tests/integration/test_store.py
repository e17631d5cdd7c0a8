"""The tensor store against a real redis-server."""

import socket

import numpy as np
import pytest
import redis

from libe_cnn import codec
from libe_cnn.redis_server import PrivateRedis
from libe_cnn.store import RedisAddress, RunKey, RunRedisConnector, TensorStore, delete_run_keys, run_keys


def test_put_get_many_evict(redis_address):
    store = TensorStore(redis_address, "run-a")
    arrays = [np.arange(1000, dtype=np.float32) * i for i in range(3)]
    keys = [store.put(a) for a in arrays]
    assert all(k.startswith("run-a:") for k in keys)
    np.testing.assert_array_equal(store.get(keys[1]), arrays[1])
    for got, want in zip(store.get_many(keys), arrays):
        np.testing.assert_array_equal(got, want)
    store.evict(keys)
    assert run_keys(redis_address, "run-a") == []
    with pytest.raises(KeyError, match="missing"):
        store.get(keys[0])
    store.close()


def test_named_entries_are_predictable_within_the_run(redis_address):
    writer, reader = TensorStore(redis_address, "run-n"), TensorStore(redis_address, "run-n")
    key = writer.put(np.arange(5, dtype=np.float32), "gossip-3-1")
    assert key == reader.key("gossip-3-1") == "run-n:gossip-3-1"
    np.testing.assert_array_equal(reader.get(key), np.arange(5, dtype=np.float32))
    writer.evict([key])
    assert run_keys(redis_address, "run-n") == []
    writer.close()
    reader.close()


def test_a_run_deletes_only_its_own_keys(redis_address):
    a, b = TensorStore(redis_address, "run-b"), TensorStore(redis_address, "run-c")
    a.put(np.ones(3, np.float32))
    kb = b.put(np.ones(3, np.float32))
    with redis_address.client() as client:
        client.set("someone-else", b"x")
    assert delete_run_keys(redis_address, "run-b") == 1
    assert run_keys(redis_address, "run-b") == []
    assert run_keys(redis_address, "run-c") == [kb]
    with redis_address.client() as client:
        assert client.get("someone-else") == b"x"
        client.delete("someone-else")
    delete_run_keys(redis_address, "run-c")


def test_connector_refuses_other_runs_keys(redis_address):
    connector = RunRedisConnector(redis_address.host, redis_address.port, redis_address.password, "run-d")
    with pytest.raises(KeyError, match="does not belong"):
        connector.get(RunKey("run-e:123"))
    connector.close()


def test_pickle_payload_under_a_run_key_is_refused(redis_address, tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    import pickle

    with redis_address.client() as client:
        client.set("run-f:evil", pickle.dumps(Exploit()))
    store = TensorStore(redis_address, "run-f")
    with pytest.raises(codec.CodecError):
        store.get("run-f:evil")
    assert not marker.exists()
    delete_run_keys(redis_address, "run-f")


def test_private_server_requires_its_password_and_stops():
    server = PrivateRedis()
    address = server.start()
    assert address.host == "127.0.0.1" and len(address.password) >= 24
    with pytest.raises(redis.AuthenticationError):
        RedisAddress(address.host, address.port, "wrong").client().ping()
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):  # no password: NOAUTH
        RedisAddress(address.host, address.port, None).client().set("k", "v")
    process = server.process
    assert address.client().ping()
    assert address.client().config_get("protected-mode") == {"protected-mode": "yes"}
    assert address.client().config_get("bind")["bind"] == "127.0.0.1"
    server.stop()
    assert process.poll() is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address.host, address.port), timeout=1)


def test_client_reads_with_hiredis_and_writes_large_values_without_copies(redis_address):
    from redis.connection import PythonRespSerializer, _HiredisParser

    client = redis_address.client()
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["parser_class"] is _HiredisParser
    assert isinstance(kwargs["command_packer"], PythonRespSerializer)
    big = bytearray(6_000_000)
    packed = kwargs["command_packer"].pack("SET", "k", big)
    assert any(chunk is big for chunk in packed)  # sent as it is, not copied into a new buffer
    client.set("store-test:big", big)
    assert client.get("store-test:big") == bytes(big)
    client.delete("store-test:big")


def test_liveness_sees_a_worker_stop_beating(redis_address):
    from libe_cnn.liveness import Heartbeat, LivenessCheck

    check = LivenessCheck(redis_address, "run-live", 2)
    assert check.lost() == []  # neither has started yet: within the start-up grace
    beats = [Heartbeat(redis_address, "run-live", s) for s in range(2)]
    assert check.lost() == []
    beats[1].stop()  # as if worker 2 went silent: its key is gone (or expired)
    assert check.lost() == [1]
    beats[0].stop()
    assert check.lost() == [0, 1]
    assert run_keys(redis_address, "run-live") == []
    check.close()


def test_one_key_goes_through_proxystore_and_several_through_one_batch_call(redis_address):
    from unittest import mock

    store = TensorStore(redis_address, "run-g")
    arrays = [np.arange(4, dtype=np.float32) + i for i in range(3)]
    with mock.patch.object(store._store, "put", wraps=store._store.put) as put, \
         mock.patch.object(store._store, "get", wraps=store._store.get) as get, \
         mock.patch.object(store._store, "evict", wraps=store._store.evict) as evict, \
         mock.patch.object(store._connector, "get_batch", wraps=store._connector.get_batch) as get_batch, \
         mock.patch.object(store._connector, "evict_batch", wraps=store._connector.evict_batch) as evict_batch:
        keys = [store.put(arrays[0]), store.put(arrays[1], "named-1"), store.put(arrays[2], "named-2")]
        assert put.call_count == 3 and keys[1:] == ["run-g:named-1", "run-g:named-2"]
        np.testing.assert_array_equal(store.get(keys[1]), arrays[1])
        np.testing.assert_array_equal(store.get_many([keys[2]])[0], arrays[2])
        assert get.call_count == 2 and get_batch.call_count == 0
        for got, want in zip(store.get_many(keys), arrays):  # several: one MGET, not Store.get each
            np.testing.assert_array_equal(got, want)
        assert get.call_count == 2 and get_batch.call_count == 1
        store.evict([keys[0]])
        assert evict.call_count == 1 and evict_batch.call_count == 0
        store.evict(keys[1:])
        assert evict.call_count == 1 and evict_batch.call_count == 1
    assert run_keys(redis_address, "run-g") == []
    with pytest.raises(KeyError, match="missing"):
        store.get_many(keys[1:])
    assert store.get_many([]) == []
    store.close()


def test_a_bad_payload_is_a_codec_error_on_both_read_paths(redis_address):
    store = TensorStore(redis_address, "run-h")
    good = store.put(np.ones(3, np.float32))
    with redis_address.client() as client:
        client.set("run-h:bad", b"not a tensor")
    with pytest.raises(codec.CodecError, match="run-h:bad.*bad magic"):
        store.get("run-h:bad")  # through the Store, which wraps the codec's error
    with pytest.raises(codec.CodecError):
        store.get_many([good, "run-h:bad"])  # through one MGET
    with pytest.raises(KeyError, match="does not belong"):
        store.get("run-x:1")
    delete_run_keys(redis_address, "run-h")
    store.close()


def test_connector_meets_proxystores_protocol_and_config_round_trip(redis_address):
    from proxystore.connectors.protocols import Connector
    from proxystore.store import Store

    store = TensorStore(redis_address, "run-i")
    connector = store._connector
    assert isinstance(connector, Connector)
    assert redis_address.password not in repr(store._store)  # the connector's repr leaves it out
    # How ProxyStore rebuilds a store elsewhere (e.g. to resolve a proxy): cls(**connector.config()).
    copy = Store.from_config(store._store.config())
    again = RunRedisConnector.from_config(connector.config())
    keys = connector.put_batch([codec.encode(np.full(2, i, np.float32)) for i in range(2)])
    assert all(connector.exists(k) and k.redis_key.startswith("run-i:") for k in keys)
    np.testing.assert_array_equal(copy.get(keys[1]), np.full(2, 1, np.float32))
    assert codec.decode(again.get(keys[0]))[0] == 0
    again.evict_batch(keys)
    assert not connector.exists(keys[0])
    for s in (copy, store):
        s.close()
    again.close()


def test_a_hand_off_is_one_round_trip_each_way_and_taken_once(redis_address):
    """A pipeline's activations: the key is the hand-off, pushed by the sender, popped by the receiver."""
    store = TensorStore(redis_address, "run-handoff")
    try:
        activation = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        assert store.take("act-0", 0.05) is None  # not there yet: the wait times out
        store.hand_over("act-0", activation)
        assert np.array_equal(store.take("act-0", 1), activation)  # the shape travels with the bytes
        assert store.take("act-0", 0.05) is None and run_keys(redis_address, "run-handoff") == []
    finally:
        store.close()

"""The streamed exchange of sync against real redis-servers: a worker's model hooked into the
stream, the generator's reduction of a step's buckets (star), and the workers' reduction of
one chunk each (ring), over one server or two."""

import threading
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gen_funcs.messaging import Messenger, NonFinite
from gen_funcs.parent import ParentModel
from libe_cnn import stream, waits
from libe_cnn.buckets import bucket_layout
from libe_cnn.config import TrainConfig
from libe_cnn.flat import flatten_gradients, flatten_parameters
from libe_cnn.plan import GEN_OUT
from libe_cnn.store import ServerGroup, TensorStore, consecutive_homes, delete_run_keys, run_keys
from libe_cnn.reduction import reduce_in_order
from libe_cnn.stream import Layout
from libe_cnn.stream_generator import Senders, reduce_step
from mnist.model import MODELS


@pytest.fixture
def run_id(redis_address, second_redis, request):
    name = f"stream-{request.node.name}"
    yield name
    delete_run_keys(redis_address, name)
    delete_run_keys(second_redis, name)


def streamed_worker(redis_address, run_id, model, buckets, stopped=lambda: False):
    flat_params, flat_grad = flatten_parameters(model), flatten_gradients(model)
    layout = Layout(buckets, 1)
    loader = stream.ParameterLoader(ServerGroup([redis_address], run_id, [0]), 0, layout, flat_params, "float32")
    sender = stream.GradientSender(ServerGroup([redis_address], run_id, [0]), 0, layout, flat_grad, "float32")
    return stream.StreamedModel(model, buckets, loader, sender, stopped), flat_grad


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10", "iris"])
def test_forward_waits_for_each_layer_and_the_buckets_leave_as_backward_finishes_them(redis_address, run_id,
                                                                                         dataset):
    torch.manual_seed(0)
    reference, model = MODELS[dataset](dropout=False), MODELS[dataset](dropout=False)
    target = torch.cat([p.detach().reshape(-1) for p in reference.parameters()]).numpy()
    buckets = bucket_layout(model, 1)  # each tensor a bucket
    streamed, flat_grad = streamed_worker(redis_address, run_id, model, buckets)
    publisher = TensorStore(redis_address, run_id)
    shape = {"fashion-mnist": (8, 1, 28, 28), "cifar10": (8, 3, 32, 32), "iris": (8, 4)}[dataset]
    x, y = torch.randn(shape), torch.randint(0, 3, (8,))

    def publish_slowly():  # the first layer's bucket at once, the others later
        for i, b in enumerate(reversed(buckets)):
            time.sleep(0.3 if i == 1 else 0.0)
            publisher.put(target[b.start : b.stop], stream.params_name(7, b.index, 0))
            publisher.notify([stream.params_ready(0)], f"7 {b.index}")

    thread = threading.Thread(target=publish_slowly)
    thread.start()
    streamed.begin(7)
    loss = F.nll_loss(model(x), y)
    streamed.before_backward(loss.item())
    loss.backward()
    streamed.sender.flush()
    thread.join()
    assert streamed.load_wait_s >= 0.25  # forward waited for the later buckets
    expected = F.nll_loss(reference(x), y)
    expected.backward()
    assert torch.equal(loss, expected)
    # Every bucket is in the store, announced last layer first (within a layer autograd picks
    # the order), holding its slice of the gradient.
    tokens = [stream.parse_grad_token(publisher.next_tokens(stream.GRAD_ARRIVALS, 1, most=1)[0]) for _ in buckets]
    assert sorted(t[:3] for t in tokens) == [(7, 0, b.index) for b in buckets]
    assert tokens[0][2] in (0, 1) and tokens[-1][2] in (len(buckets) - 2, len(buckets) - 1)
    assert all(t[3] == loss.item() for t in tokens)
    want = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).numpy()
    assert np.array_equal(flat_grad.numpy(), want)
    for b in buckets:
        got = publisher.get(publisher.key(stream.grad_name(7, 0, b.index, 0)))
        assert np.array_equal(got, want[b.start : b.stop])
    streamed.loader.close()
    streamed.sender.close()


def test_a_worker_waiting_for_parameters_notices_the_stop(redis_address, run_id):
    model = MODELS["iris"]()
    stop = threading.Event()
    streamed, _ = streamed_worker(redis_address, run_id, model, bucket_layout(model, 1), stopped=stop.is_set)
    streamed.begin(0)  # nothing is ever published
    threading.Timer(0.2, stop.set).start()
    t0 = time.perf_counter()
    with pytest.raises(waits.Stopped):
        model(torch.zeros(1, 4))
    assert time.perf_counter() - t0 < 0.2 + 2 * waits.POLL_S
    streamed.loader.close()
    streamed.sender.close()


def generator(addresses, run_id, tmp_path, n, on_nonfinite, reduce="sum"):
    """What reduce_step uses of a GenRun: the parent, the stores and the messages."""
    cfg = TrainConfig(run_dir=str(tmp_path), dataset="iris", n_workers=n, on_nonfinite=on_nonfinite,
                      bucket_mb=1e-7, reduce=reduce)
    store = TensorStore(addresses[0], run_id)
    no_mail = types.SimpleNamespace(comm=types.SimpleNamespace(mail_flag=lambda: False))  # nobody stops it
    messages = Messenger(cfg, no_mail, store, None, GEN_OUT)
    parent = ParentModel(cfg, torch.device("cpu"))
    return types.SimpleNamespace(n=n, cfg=cfg, parent=parent, store=store, 
                                 servers=ServerGroup(addresses, run_id, consecutive_homes(n, len(addresses))),
                                 messages=messages, screen=messages.screen)


def send_gradients(run, step, grads, order):
    """What the workers' senders do with star: each bucket whole to its home server."""
    for shard, index in order:
        b = run.parent.buckets[index]
        run.servers.home(shard).put(grads[shard][b.start : b.stop], stream.grad_name(step, shard, index, 0))
        run.store.notify([stream.GRAD_ARRIVALS], stream.grad_token(step, shard, index, 0.5))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_a_worker_found_non_finite_in_a_later_bucket_is_left_out_of_every_bucket(redis_address, run_id, tmp_path,
                                                                                  reduce):
    run = generator([redis_address], run_id, tmp_path, 3, "skip", reduce)
    buckets = run.parent.buckets
    assert len(buckets) == 4  # each of the Iris MLP's tensors
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(run.parent.host_grad.size).astype(np.float32) for _ in range(3)]
    grads[1][buckets[-1].start] = np.nan  # in the bucket that arrives last
    # Every bucket but the last from everyone first: they are reduced over all three workers ...
    order = [(s, i) for i in range(len(buckets) - 1) for s in (2, 0, 1)] + [(s, len(buckets) - 1) for s in range(3)]
    send_gradients(run, 4, grads, order)
    got = reduce_step(run, 4, Layout(buckets, 1), Senders(3))
    # ... and again without worker 2 once its last bucket shows the NaN.
    assert got.good == [0, 2] and got.losses == [0.5] * 3 and len(got.keys) == 12
    want = reduce_in_order([grads[0], grads[2]], np.empty_like(grads[0]), reduce)
    assert np.array_equal(run.parent.host_grad, want)


def test_a_non_finite_bucket_stops_the_step_before_any_parameter_changes(redis_address, run_id, tmp_path):
    run = generator([redis_address], run_id, tmp_path, 2, "stop")
    buckets = run.parent.buckets
    before = run.parent.host_params.copy()
    grads = [np.ones(run.parent.host_grad.size, np.float32) for _ in range(2)]
    grads[0][buckets[0].start] = np.inf
    send_gradients(run, 0, grads, [(s, i) for i in range(len(buckets)) for s in range(2)])
    with pytest.raises(NonFinite, match="worker 1 at step 1"):
        reduce_step(run, 0, Layout(buckets, 1), Senders(2))
    assert np.array_equal(run.parent.host_params, before) and run.parent.version == 0


def ring_step(run, run_id, step, grads, losses, wire="float32"):
    """Every worker's sender and chunk reducer (threads, as in a simulator) on one step's gradients;
    returns what the generator reduces from them."""
    layout = Layout(run.parent.buckets, run.n)
    addresses = [s._connector.address for s in run.servers.stores]
    workers = []
    for shard, grad in enumerate(grads):
        flat = torch.from_numpy(grad)
        workers.append((stream.GradientSender(ServerGroup(addresses, run_id, run.servers.homes), shard, layout,
                                              flat, wire),
                        stream.ChunkReducer(ServerGroup(addresses, run_id, run.servers.homes), shard, layout,
                                            wire, run.cfg.reduce)))
    for index in range(len(layout.buckets)):  # backward's order on every worker
        for shard, (sender, _) in enumerate(workers):
            sender.submit(step, index, losses[shard])
    try:
        return reduce_step(run, step, layout, Senders(run.n))
    finally:
        for sender, reducer in workers:
            sender.flush()
            reducer.check()
            for thread in (sender, reducer):
                thread.close()
                thread.servers.close()


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_ring_gives_the_generator_the_same_bits_as_star(redis_address, second_redis, run_id, tmp_path, servers,
                                                        reduce):
    addresses = [redis_address, second_redis][:servers]
    n = 3
    star = generator(addresses, run_id, tmp_path, n, "stop", reduce)
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(star.parent.host_grad.size).astype(np.float32) for _ in range(n)]
    buckets = star.parent.buckets
    send_gradients(star, 0, grads, [(s, i) for i in range(len(buckets)) for s in range(n)])
    reduce_step(star, 0, Layout(buckets, 1), Senders(n))
    ring = generator(addresses, run_id, tmp_path, n, "stop", reduce)
    got = ring_step(ring, run_id, 1, grads, [0.25, 0.5, 0.75])
    assert got.good == [0, 1, 2] and got.losses == [0.25, 0.5, 0.75]
    assert np.array_equal(ring.parent.host_grad, star.parent.host_grad)
    if servers == 2:  # each worker's chunks on its own home server: workers 1-2 on the first, 3 on the second
        second = ServerGroup([second_redis], run_id, [0]).stores[0]
        assert second.get(second.key(stream.grad_name(1, 2, 0, 1))) is not None
        with pytest.raises(KeyError):
            second.get(second.key(stream.grad_name(1, 1, 0, 1)))
    # What the step left in the store is all it names: evicting it leaves nothing of the step.
    ring.servers.evict(got.keys)
    for address in addresses:
        assert [k for k in run_keys(address, run_id) if k.split(":")[1].split("-")[1] == "1"] == []


def test_ring_leaves_a_non_finite_worker_out_as_star_does(redis_address, run_id, tmp_path):
    n = 3
    run = generator([redis_address], run_id, tmp_path, n, "skip")
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(run.parent.host_grad.size).astype(np.float32) for _ in range(n)]
    grads[2][run.parent.buckets[1].start] = np.inf
    got = ring_step(run, run_id, 5, grads, [0.5] * n)
    assert got.good == [0, 1]
    want = reduce_in_order(grads[:2], np.empty_like(grads[0]), "sum")
    assert np.array_equal(run.parent.host_grad, want)
    stopping = generator([redis_address], run_id, tmp_path, n, "stop")
    with pytest.raises(NonFinite, match="worker 3 at step 7"):
        ring_step(stopping, run_id, 6, grads, [0.5] * n)


def test_ring_in_bfloat16_rounds_each_copy_as_star_does(redis_address, run_id, tmp_path):
    from libe_cnn.wire import from_wire, to_wire

    n = 2
    run = generator([redis_address], run_id, tmp_path, n, "stop")
    run.cfg.wire_dtype = "bfloat16"
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal(run.parent.host_grad.size).astype(np.float32) for _ in range(n)]
    ring_step(run, run_id, 0, grads, [0.5] * n, wire="bfloat16")
    rounded = [from_wire(to_wire(torch.from_numpy(g), "bfloat16"), "bfloat16") for g in grads]
    assert np.array_equal(run.parent.host_grad, reduce_in_order(rounded, np.empty_like(grads[0]), "sum"))

"""The streamed exchange of sync against a real redis-server: a worker's model hooked into the
stream, and the generator's reduction of a step's buckets."""

import threading
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gen_funcs.messaging import Messenger, NonFinite
from gen_funcs.parent import ParentModel
from libe_cnn import stream
from libe_cnn.buckets import bucket_layout
from libe_cnn.config import TrainConfig
from libe_cnn.flat import flatten_gradients, flatten_parameters
from libe_cnn.plan import GEN_OUT
from libe_cnn.store import TensorStore, delete_run_keys
from libe_cnn.strategies.base import reduce_in_order
from libe_cnn.stream import reduce_step
from mnist.model import MODELS


@pytest.fixture
def run_id(redis_address, request):
    name = f"stream-{request.node.name}"
    yield name
    delete_run_keys(redis_address, name)


def streamed_worker(redis_address, run_id, model, buckets, stopped=lambda: False):
    flat_params, flat_grad = flatten_parameters(model), flatten_gradients(model)
    loader = stream.ParameterLoader(TensorStore(redis_address, run_id), 0, buckets, flat_params, "float32")
    sender = stream.GradientSender(TensorStore(redis_address, run_id), 0, buckets, flat_grad, "float32")
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
            publisher.put(target[b.start : b.stop], stream.params_name(7, b.index))
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
    tokens = [stream.parse_grad_token(publisher.next_token(stream.GRAD_ARRIVALS, 1)) for _ in buckets]
    assert sorted(t[:3] for t in tokens) == [(7, 0, b.index) for b in buckets]
    assert tokens[0][2] in (0, 1) and tokens[-1][2] in (len(buckets) - 2, len(buckets) - 1)
    assert all(t[3] == loss.item() for t in tokens)
    want = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]).numpy()
    assert np.array_equal(flat_grad.numpy(), want)
    for b in buckets:
        got = publisher.get(publisher.key(stream.grad_name(7, 0, b.index)))
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
    with pytest.raises(stream.Stopped):
        model(torch.zeros(1, 4))
    assert time.perf_counter() - t0 < 0.2 + 2 * stream.POLL_S
    streamed.loader.close()
    streamed.sender.close()


def generator(redis_address, run_id, tmp_path, n, on_nonfinite):
    """What reduce_step uses of a GenRun: the parent, the store and the messages."""
    cfg = TrainConfig(run_dir=str(tmp_path), dataset="iris", n_workers=n, on_nonfinite=on_nonfinite,
                      bucket_mb=1e-7)
    store = TensorStore(redis_address, run_id)
    no_mail = types.SimpleNamespace(comm=types.SimpleNamespace(mail_flag=lambda: False))  # nobody stops it
    messages = Messenger(cfg, no_mail, store, None, GEN_OUT)
    parent = ParentModel(cfg, torch.device("cpu"))
    return types.SimpleNamespace(n=n, cfg=cfg, parent=parent, store=store, messages=messages,
                                 fetch=messages.fetch, screen=messages.screen)


def send_gradients(store, step, grads, buckets, order):
    for shard, index in order:
        b = buckets[index]
        store.put(grads[shard][b.start : b.stop], stream.grad_name(step, shard, index))
        store.notify([stream.GRAD_ARRIVALS], stream.grad_token(step, shard, index, 0.5))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_a_worker_found_non_finite_in_a_later_bucket_is_left_out_of_every_bucket(redis_address, run_id, tmp_path,
                                                                                  reduce):
    run = generator(redis_address, run_id, tmp_path, 3, "skip")
    run.cfg.reduce = reduce
    buckets = run.parent.buckets
    assert len(buckets) == 4  # each of the Iris MLP's tensors
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(run.parent.host_grad.size).astype(np.float32) for _ in range(3)]
    grads[1][buckets[-1].start] = np.nan  # in the bucket that arrives last
    # Every bucket but the last from everyone first: they are reduced over all three workers ...
    order = [(s, i) for i in range(len(buckets) - 1) for s in (2, 0, 1)] + [(s, len(buckets) - 1) for s in range(3)]
    send_gradients(run.store, 4, grads, buckets, order)
    got = reduce_step(run, 4)
    # ... and again without worker 2 once its last bucket shows the NaN.
    assert got.good == [0, 2] and got.losses == [0.5] * 3 and len(got.keys) == 12
    want = reduce_in_order([grads[0], grads[2]], np.empty_like(grads[0]), reduce)
    assert np.array_equal(run.parent.host_grad, want)


def test_a_non_finite_bucket_stops_the_step_before_any_parameter_changes(redis_address, run_id, tmp_path):
    run = generator(redis_address, run_id, tmp_path, 2, "stop")
    buckets = run.parent.buckets
    before = run.parent.host_params.copy()
    grads = [np.ones(run.parent.host_grad.size, np.float32) for _ in range(2)]
    grads[0][buckets[0].start] = np.inf
    send_gradients(run.store, 0, grads, buckets, [(s, i) for i in range(len(buckets)) for s in range(2)])
    with pytest.raises(NonFinite, match="worker 1 at step 1"):
        reduce_step(run, 0)
    assert np.array_equal(run.parent.host_params, before) and run.parent.version == 0

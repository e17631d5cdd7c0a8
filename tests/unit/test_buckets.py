"""Buckets: how the model is cut for the streamed exchange, and stepping bucket by bucket."""

import math

import numpy as np
import pytest
import torch

from gen_funcs.parent import ParentModel
from libe_cnn.buckets import bucket_layout, buckets_of_modules, forward_order
from libe_cnn.config import TrainConfig
from mnist.model import MODELS

MiB = 2**20


@pytest.mark.parametrize("dataset", sorted(MODELS))
@pytest.mark.parametrize("cap", [1, 64 * 1024, MiB, math.inf])
def test_buckets_are_whole_tensors_tiling_the_flat_buffer_from_the_end(dataset, cap):
    model = MODELS[dataset]()
    sizes = [p.numel() for p in model.parameters()]
    buckets = bucket_layout(model, cap)
    assert [b.index for b in buckets] == list(range(len(buckets)))
    # From the last parameter backwards, contiguous, covering everything once.
    assert buckets[0].stop == sum(sizes) and buckets[-1].start == 0
    assert all(a.start == b.stop for a, b in zip(buckets, buckets[1:]))
    assert sorted(i for b in buckets for i in b.params) == list(range(len(sizes)))
    for b in buckets:
        assert b.stop - b.start == sum(sizes[i] for i in b.params)
    # Every bucket but the first layers' holds at least the cap; one of them, all tensors.
    assert all((b.stop - b.start) * 4 >= cap for b in buckets[:-1])
    if cap == 1:
        assert len(buckets) == len(sizes)
    if cap == math.inf:
        assert len(buckets) == 1
    assert forward_order(buckets)[0].start == 0


def test_the_mnist_cnn_streams_its_fully_connected_layers_apart_from_its_convolutions():
    model = MODELS["fashion-mnist"]()
    fc, conv = bucket_layout(model, MiB)
    names = [name for name, _ in model.named_parameters()]
    assert [names[i] for i in fc.params] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert [names[i] for i in conv.params] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]
    needs = {type(m).__name__ + str(i): v for i, (m, v) in enumerate(buckets_of_modules(model, [fc, conv]).items())}
    assert list(needs.values()) == [(1,), (1,), (0,), (0,)]  # conv1, conv2, fc1, fc2: each its own bucket


@pytest.mark.parametrize("optimizer", ["adam", "adadelta", "sgd"])
def test_stepping_bucket_by_bucket_gives_the_bits_of_one_whole_step(optimizer, tmp_path):
    def parent(strategy):  # async takes its gradients whole, sync in buckets
        cfg = TrainConfig(run_dir=str(tmp_path), dataset="fashion-mnist", optimizer=optimizer, lr=0.01,
                          strategy=strategy)
        return ParentModel(cfg, torch.device("cpu"))

    whole, streamed = parent("async"), parent("sync")
    assert len(whole.buckets) == 1 and len(streamed.buckets) == 2
    rng = np.random.default_rng(0)
    order = []
    for _ in range(3):
        grads = [rng.standard_normal(whole.host_grad.size).astype(np.float32) for _ in range(2)]
        whole.apply(grads, "sum")
        for b in streamed.buckets:
            assert streamed.reduce_bucket(b, [g[b.start : b.stop] for g in grads], "sum")
        streamed.step_by_bucket(lambda b: order.append(b.index))
    assert order == [1, 0] * 3  # the convolutions (needed first by forward) are stepped first
    assert np.array_equal(whole.host_params, streamed.host_params)
    assert whole.version == streamed.version == 3
    # The state checkpoints save is the whole model's, and restores into either.
    saved = streamed.optimizer.state_dict()
    assert len(saved["state"]) == len(list(whole.model.parameters()))
    for a, b in zip(whole.optimizer.state_dict()["state"].values(), saved["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_reduced_bucket_says_whether_it_is_finite(tmp_path):
    parent = ParentModel(TrainConfig(run_dir=str(tmp_path), dataset="iris"), torch.device("cpu"))
    [b] = parent.buckets
    ones = np.ones(b.stop - b.start, np.float32)
    assert parent.reduce_bucket(b, [ones, ones], "mean")
    bad = ones.copy()
    bad[3] = np.nan
    assert not parent.reduce_bucket(b, [ones, bad], "sum")
    bad[3] = np.inf
    assert not parent.reduce_bucket(b, [bad, ones], "sum")

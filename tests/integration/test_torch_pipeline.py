"""torch.distributed.pipelining, the peer baseline of the pipeline benchmark, runs and trains exactly.

Real processes over gloo: each `run` spawns its two stages (about 5 s here, most of it
importing torch and tracing the model).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.torch_pipeline import make_batches, model_layers, run
from mnist.model import make_optimizer


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stages_train(schedule):
    result = run("fashion-mnist", "cnn", [2], 2, schedule, batch_size=16, steps=3, warmup=1, deadline=120)
    assert len(result["losses"]) == 4 and all(math.isfinite(v) for v in result["losses"])
    assert result["samples_per_s"] > 0 and result["step_s"] > 0
    assert len(result["stage_busy_s"]) == len(result["bubble"]) == len(result["peak_rss_mb"]) == 2
    assert all(b > 0 for b in result["stage_busy_s"])
    # stage 0 holds layers 0-1 (conv1, conv2), stage 1 layers 2-3 (fc1, fc2)
    assert result["stage_parameters"] == [32 * 9 + 32 + 64 * 32 * 9 + 64, 9216 * 128 + 128 + 128 * 10 + 10]


def test_one_step_equals_one_process_on_the_whole_batch():
    """Gradients reach stage 0 and the micro-batch losses add up to the batch mean."""
    batch, seed = 16, 1
    result = run("fashion-mnist", "cnn", [2], 2, "1f1b", batch_size=batch, steps=1, warmup=0, seed=seed,
                 dropout=False, return_params=True, deadline=120)

    model = model_layers("fashion-mnist", "cnn", seed, dropout=False).train()
    optimizer = make_optimizer("adam", model.parameters(), 1e-3)
    x, y = make_batches("fashion-mnist", batch, 1, seed)
    loss = F.nll_loss(model(x[0]), y[0])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()

    assert result["losses"][0] == pytest.approx(loss.item(), rel=1e-6)
    got = {name: (stage_p[name], stage_g[name])
           for stage_p, stage_g in zip(result["params"], result["grads"]) for name in stage_p}
    assert sorted(got) == sorted(grads)
    for name, p in model.named_parameters():
        param, grad = (torch.from_numpy(a) for a in got[name])
        # A gradient off by the number of micro-batches, or missing, is off by its whole size.
        assert (grad - grads[name]).abs().max() <= 1e-4 * grads[name].abs().max(), name
        # Adam's first step is about lr * sign(gradient): 1e-3 where a gradient is lost.
        assert (param - p.detach()).abs().max() <= 5e-5, name

"""Every --strategy through real processes: libEnsemble workers, redis-server, real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from libe_cnn.strategies.base import average_parameters
from libe_cnn.strategies.easgd import EASGD_BETA, elastic_center_update, elastic_pull
from libe_cnn.strategies.elastic_gossip import DEFAULT_ALPHA, elastic_exchange
from libe_cnn.strategies.gossip import gossip_pairing, pairwise_average
from libe_cnn.strategies.weighted_param_avg import mix_parameters
from libe_cnn.flat import flatten_gradients, flatten_parameters
from libe_cnn.store import run_keys
from mnist.data import BatchOrder, load_shard
from mnist.model import build_model, make_optimizer
from tests.conftest import run_cli
from tests.integration.test_trainer import redis_env


def read_run(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run_dir / "config.json").read_text())
    return summary, records, config


# One real-process run per family (sync runs in test_trainer; elastic-gossip shares gossip's loops);
# tests/loops runs every strategy in-process, with staleness limits, non-finite results and the
# evaluation and checkpoint boundaries.
@pytest.mark.parametrize("strategy", ["ring-allreduce", "async", "easgd", "gossip"])
def test_each_strategy_trains_with_three_workers(tmp_path, fashion_files, redis_address, strategy):
    run_dir = tmp_path / "run"
    result = run_cli("run_libe_cnn.py", "-n", "3", "--dataset", "fashion-mnist", "--limit-train", "6144",
                     "--max-steps", "12", "--eval-every", "4", "--limit-test", "1000", "--strategy", strategy,
                     "--run-dir", str(run_dir), env=redis_env(redis_address))
    assert result.returncode == 0, result.stderr[-3000:]
    summary, records, config = read_run(run_dir)
    assert summary["strategy"] == config["strategy"] == strategy and summary["completed"]
    assert summary["samples"] == 12 * 3 * 64  # the same sample budget for every strategy
    assert summary["test_accuracy"] > 0.4, summary  # chance is 0.1
    assert summary["store_bytes_per_sample"] > 0
    evals = [r for r in records if r.get("event") == "eval"]
    steps = [r for r in records if "event" not in r]
    # Evaluated at the same points. Async results often arrive several at once; an evaluation
    # still sees the parent exactly after the gradients that complete its step.
    assert [e["samples"] for e in evals] == [k * 4 * 3 * 64 for k in range(1, 4)]
    assert run_keys(redis_address, config["run_id"]) == []
    if strategy == "async":
        # One step per gradient; every gradient's staleness is recorded.
        assert len(steps) == summary["steps"] == 36
        assert all(r["staleness"] >= 0 for r in steps) and max(r["staleness"] for r in steps) >= 1
        assert summary["updates"] + summary["dropped"] == 36 and summary["dropped"] == 0
        # One count everywhere, named for what it counts: the header, the progress line, the done line.
        err = result.stderr
        assert "36 gradients (12 per worker)" in err and "gradient 36/36" in err and "gradient 36: test" in err, err
        assert "done: 36 gradients (36 applied, 0 dropped as stale)" in result.stdout, result.stdout
    elif strategy == "ring-allreduce":
        assert [r["step"] for r in steps] == list(range(1, 13))
    else:
        # Rounds of 4 local steps, each ending at an evaluation point.
        assert [r["step"] for r in steps] == [4, 8, 12] and summary["exchanges"] == 2


# --- parity: the ensemble computes exactly what one process computes with the same math ---

def reference_run(files, strategy: str, seed: int, n_train: int, n: int, batch: int, steps: int, lr: float,
                  period: int, agg_prob: float = 1.0) -> dict:
    """N worker models trained in one process with the strategy's math, on the same batches.

    Returns the state_dict of the model the ensemble saves: the parent (param-avg,
    weighted-param-avg, diloco), the center (easgd) or the workers' mean (gossip, elastic-gossip, local).
    """
    parent = build_model(seed, dropout=False)
    parent_flat = flatten_parameters(parent).numpy()
    models = [build_model(seed, dropout=False).train() for _ in range(n)]
    flats = [flatten_parameters(m) for m in models]
    for m in models:
        flatten_gradients(m)
    optimizers = [make_optimizer("sgd", m.parameters(), lr) for m in models]
    shards = [load_shard(files, n_train, n, s, seed) for s in range(n)]
    orders = [BatchOrder(len(y), seed, s, len(y) // batch, batch) for s, (_, y) in enumerate(shards)]
    alpha = EASGD_BETA / n
    rounds = [(start, min(start + period, steps)) for start in range(0, steps, period)]
    outer_momentum = None  # diloco's Nesterov buffer
    for r, (start, end) in enumerate(rounds):
        for s, (model, opt) in enumerate(zip(models, optimizers)):
            for t in range(start, end):
                x, y = shards[s]
                pos = torch.from_numpy(orders[s].positions(t))
                model.zero_grad(set_to_none=False)
                F.nll_loss(model(x[pos]), y[pos]).backward()
                opt.step()
        workers = [f.numpy() for f in flats]
        sent = [w.copy() for w in workers]
        if strategy == "param-avg":
            average_parameters(sent, parent_flat)
        elif strategy == "weighted-param-avg":
            mix_parameters(parent_flat, average_parameters(sent, np.empty_like(parent_flat)), 0.5)
        elif strategy == "diloco":  # SGD with Nesterov momentum on parent - mean, the defaults 0.7 and 0.9
            g = parent_flat - average_parameters(sent, np.empty_like(parent_flat))
            outer_momentum = g if outer_momentum is None else np.float32(0.9) * outer_momentum + g
            parent_flat -= np.float32(0.7) * (g + np.float32(0.9) * outer_momentum)
        elif strategy == "easgd":
            center_before = parent_flat.copy()
            elastic_center_update(parent_flat, sent, alpha)
        if r == len(rounds) - 1:
            break
        for s, w in enumerate(workers):  # what each worker does with the generator's answer
            if strategy in ("param-avg", "weighted-param-avg", "diloco"):
                np.copyto(w, parent_flat)
            elif strategy == "easgd":
                elastic_pull(w, center_before, alpha)
            elif strategy in ("gossip", "elastic-gossip"):
                # Round r + 1 starts with the r-th pairing: the first round starts from the parent.
                peer = gossip_pairing(n, r, seed, "random", agg_prob)[s]
                if peer >= 0 and strategy == "gossip":
                    pairwise_average(w, sent[peer])
                elif peer >= 0:  # from the peer's parameters as it sent them, before its own move
                    elastic_exchange(w, sent[peer], DEFAULT_ALPHA)
    if strategy in ("gossip", "elastic-gossip", "local"):
        average_parameters([f.numpy() for f in flats], parent_flat)
    return parent.state_dict()

# The parity of each strategy with reference_run runs in-process: tests/loops/test_loops.py.

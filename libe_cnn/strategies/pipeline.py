"""The generator's side of --parallelism pipeline: sync over the replicas, stage by stage.

Each stage's parameters are one bucket of the parent (libe_cnn/pipeline/split.py): the
generator reduces a stage's gradient over the replicas' workers of that stage, in shard order,
as sync reduces a bucket over the workers, steps it, and publishes it to those workers only.
Not in the registry: --strategy sync with --parallelism pipeline selects it (libe_cnn/plan.py).
"""

from __future__ import annotations

import numpy as np

from libe_cnn.pipeline.schedule import bubble_fraction
from libe_cnn.stream_generator import Senders
from libe_cnn.strategies.sync import STRATEGY as SYNC, Sync


class Pipeline(Sync):
    def senders(self, cfg) -> Senders:
        return Senders(cfg.replicas, cfg.stages)

    def step_fields(self, cfg, rows: np.ndarray) -> dict:
        stages = rows["shard"] % cfg.stages
        compute, wait, busy = ([float(rows[name][stages == s].mean()) for s in range(cfg.stages)]
                               for name in ("compute_s", "peer_wait_s", "exchange_s"))
        return {"stage_compute_s": compute, "stage_peer_wait_s": wait,
                "stage_bubble": [w / (c + w + b) if c + w + b > 0 else 0.0 for c, w, b in zip(compute, wait, busy)]}

    def summary_fields(self, cfg) -> dict:
        return {"parallelism": "pipeline", "stages": cfg.stages, "replicas": cfg.replicas,
                "microbatches": cfg.microbatches, "schedule": cfg.schedule, "split": cfg.split,
                "bubble_theory": bubble_fraction(cfg.stages, cfg.microbatches)}

    def run_worker(self, worker, ps, row: np.void, out_dtype) -> None:
        worker.pipeline_loop(ps, row, out_dtype)


STRATEGY = Pipeline(SYNC.name, "sync over pipeline replicas, stage by stage", options=SYNC.options,
                    parent_optimizer=True, skips_nonfinite=True, counters=SYNC.counters, combines_pipelines=True)

"""Bookkeeping of a run on the manager: per-step records, steady throughput, the summary."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

# Per-step durations averaged into the summary (seconds); see metrics.jsonl for each step.
BREAKDOWN = ("gen_wait_s", "fetch_s", "update_s", "publish_s", "exposed_s",
             "sim_load_s", "sim_compute_s", "sim_put_s", "sim_wait_s", "sim_exchange_s")
# Measured by some strategies only. sync: the generator's CPU time in the step, its own work
# whatever the other processes take of the cores meanwhile. A pipeline: per stage, the
# workers' compute, their wait on the neighbouring stages, and that wait's share of the
# schedule's time (the bubble).
OPTIONAL = ("gen_cpu_s", "stage_compute_s", "stage_peer_wait_s", "stage_bubble")


class RunStats:
    """Steady-state numbers: everything after the warm-up steps.

    The first step includes the simulators' start-up, and the second still shows it in the
    simulators' waiting time (a worker that started early waited for the others).
    Evaluations in between stay in: workers keep training while the generator evaluates
    (for a whole round in the periodic strategies), so their time cannot be taken out.
    """

    WARMUP_STEPS = 2

    def __init__(self) -> None:
        self.seen = 0
        self.first: dict | None = None  # the last warm-up step: the clock starts after it
        self.last: dict | None = None
        self.sums: dict[str, float] = defaultdict(float)
        self.counted = 0
        self.peak_manager_rss_mb = 0.0
        self.peak_sim_rss_mb = 0.0

    def step(self, record: dict) -> None:
        self.peak_manager_rss_mb = max(self.peak_manager_rss_mb, record["manager_rss_mb"])
        self.peak_sim_rss_mb = max(self.peak_sim_rss_mb, record["sim_rss_mb"])
        self.seen += 1
        if self.seen <= self.WARMUP_STEPS:
            self.first = record
            return
        self.last = record
        self.counted += 1
        for name in BREAKDOWN:
            self.sums[name] += record[name]
        for name in OPTIONAL:
            if name in record:
                self.sums[name] = self.sums[name] + np.asarray(record[name])  # a list: one per stage

    def summary(self) -> dict:
        if self.last is None:
            return {"steady_samples_per_s": None, "breakdown_s": {}}
        elapsed = self.last["wall_s"] - self.first["wall_s"]
        samples = self.last["samples"] - self.first["samples"]
        return {
            "steady_samples_per_s": samples / elapsed if elapsed > 0 else None,
            "steady_step_s": elapsed / self.counted,
            "breakdown_s": {name: np.asarray(self.sums[name] / self.counted).tolist() for name in (*BREAKDOWN, *OPTIONAL)
                            if name in self.sums or name in BREAKDOWN},
            "peak_manager_rss_mb": self.peak_manager_rss_mb,
            "peak_sim_rss_mb": self.peak_sim_rss_mb,
        }


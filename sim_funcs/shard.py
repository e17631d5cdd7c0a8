"""What every simulator starts with: its torch threads and device, and its shard of the training set."""

from __future__ import annotations

import torch

from libe_cnn.config import TrainConfig
from libe_cnn.plan import RunPlan
from libe_cnn.runtime import available_cores, gpu_count, local_rank, select_device, set_threads, threads_per_worker
from mnist.data import BatchOrder, load_shard


def worker_device(cfg: TrainConfig, worker: int) -> torch.device:
    """Give this process its share of the cores, and pick its device (a GPU per local rank, where there are GPUs)."""
    set_threads(threads_per_worker(available_cores(), cfg.n_workers))
    return torch.device(select_device(cfg.device, local_rank(default=worker), gpu_count()))


class Shard:
    """Shard `index` of `count` of the run's training samples, on `device`, with its batches in
    their seeded order (a data-parallel worker's own shard, or a pipeline replica's)."""

    def __init__(self, plan: RunPlan, index: int, count: int, device: torch.device) -> None:
        cfg = plan.config
        images, labels = load_shard(plan.files, plan.n_train, count, index, cfg.seed)
        self.images, self.labels, self.device = images.to(device), labels.to(device), device
        self.order = BatchOrder(len(labels), cfg.seed, index, plan.steps_per_epoch, cfg.batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step`, counted from the start of training."""
        pos = torch.from_numpy(self.order.positions(step)).to(self.device)
        return self.images[pos], self.labels[pos]

"""The parent model on the manager: its parameters, its optimizer and host buffers for the math."""

from __future__ import annotations

import math
from typing import Callable

from pathlib import Path

import numpy as np
import torch

from libe_cnn.buckets import Bucket, bucket_layout, forward_order
from libe_cnn.config import TrainConfig
from libe_cnn.pipeline.split import stage_buckets
from libe_cnn.flat import copy_into, flatten_gradients, flatten_parameters, host_array, push_host_array
from libe_cnn.rundir import save_state_dict
from libe_cnn.runtime import all_cores
from libe_cnn.reduction import reduce_in_order, reduce_is_finite
from libe_cnn.strategies import strategy
from libe_cnn.wire import ParameterCopy, to_wire
from mnist.model import build_model, evaluate, make_optimizer


class ParentModel:
    """The parent model, its optimizer, and host buffers for gradients and parameters."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.model = build_model(cfg.seed, cfg.dropout, cfg.dataset, cfg.model).to(device)
        self.flat_params = flatten_parameters(self.model)
        self.flat_grad = flatten_gradients(self.model)
        on_cpu = device.type == "cpu"
        # On the CPU the math writes straight into the model's own buffers; on a GPU it
        # works on host copies, pushed to the device afterwards.
        self.host_grad = self.flat_grad.numpy() if on_cpu else np.empty(self.flat_grad.numel(), np.float32)
        self.host_params = host_array(self.flat_params)
        # The whole model's optimizer holds the state (checkpoints save it); how the parameters
        # travel: in buckets where the strategy streams them (sync), else whole.
        params = list(self.model.parameters())
        self.optimizer = (strategy(cfg.strategy).make_parent_optimizer(cfg, params)
                          or make_optimizer(cfg.optimizer, params, cfg.lr))
        # A pipeline's stages are its buckets: each stage's gradient comes and its parameters go as one.
        self.buckets = (stage_buckets(self.model, cfg.split) if cfg.parallelism == "pipeline" else
                        bucket_layout(self.model, (cfg.bucket_mb or math.inf) * 2**20))
        self._bucket_optimizers = [make_optimizer(cfg.optimizer, [params[i] for i in b.params], cfg.lr)
                                   for b in self.buckets]
        self._share_optimizer_state()
        self.version = 0  # changes of the parameters so far: tells whether a saved state is current
        # int8: the workers' copy of the parameters, which each bucket's change is sent against.
        self.workers_copy = ParameterCopy(self.flat_params.numel()) if cfg.wire_dtype == "int8" else None

    def params_for_wire(self) -> np.ndarray:
        return self.slice_for_wire(0, self.flat_params.numel())

    def slice_for_wire(self, start: int, stop: int, exact: bool = True) -> np.ndarray:
        """Parameters [start, stop) of the flat buffer in the wire type (a bucket, or a chunk of one);
        int8: their change since last sent, or all of them in float32 when `exact`."""
        if self.workers_copy is not None:
            return self.workers_copy.encode(start, stop, self.flat_params[start:stop].detach().cpu().numpy(), exact)
        return to_wire(self.flat_params[start:stop], self.cfg.wire_dtype)

    def apply(self, grads: list[np.ndarray], mode: str) -> None:
        """Reduce float32 gradients (in the given order) and take one optimizer step."""
        reduce_in_order(grads, self.host_grad, mode)
        self.step()

    def reduce_bucket(self, bucket: Bucket, grads: list[np.ndarray], mode: str) -> bool:
        """Reduce one bucket of float32 gradients (in the given order) into the parent's gradient;
        returns whether the result is finite.

        The math is elementwise: bucket by bucket it gives the same bits as `apply`'s whole buffer.
        """
        return reduce_is_finite(grads, self.host_grad[bucket.start : bucket.stop], mode)

    def step(self) -> None:
        """One optimizer step on the reduced gradient."""
        if self.device.type != "cpu":
            copy_into(self.flat_grad, self.host_grad)
        self.optimizer.step()
        self.version += 1

    def outer_step(self, gradient: Callable[[np.ndarray], None]) -> None:
        """One optimizer step on the gradient `gradient` writes into the host gradient buffer
        (DiLoCo's pseudo-gradient, from host_params): host_params follow the new parameters."""
        gradient(self.host_grad)
        self.step()
        if self.device.type != "cpu":
            self.host_params[:] = self.flat_params.cpu().numpy()

    def step_by_bucket(self, stepped: Callable[[Bucket], None]) -> None:
        """One optimizer step taken bucket by bucket, the first layers' first, handing each
        bucket to `stepped` (to publish it) before stepping the next.

        Adam, Adadelta and SGD with momentum are elementwise: stepping bucket by bucket gives
        the same bits as one step of the whole model.
        """
        self.version += 1  # from here on the parent is no longer the one of the last version
        for bucket in forward_order(self.buckets):
            if self.device.type != "cpu":
                copy_into(self.flat_grad[bucket.start : bucket.stop], self.host_grad[bucket.start : bucket.stop])
            self._bucket_optimizers[bucket.index].step()
            stepped(bucket)

    def _share_optimizer_state(self) -> None:
        # Each bucket's optimizer steps its own parameters in the state of the whole model's.
        for optimizer in self._bucket_optimizers:
            optimizer.state = self.optimizer.state

    def host_params_changed(self) -> None:
        """Push host_params, just changed by the aggregation math, into the model."""
        push_host_array(self.flat_params, self.host_params)
        self.version += 1

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        # The simulators soon wait for the generator to finish an evaluation: it may use every core.
        with all_cores():
            return evaluate(self.model, images, labels)

    def save(self, path: Path) -> None:
        save_state_dict(path, self.model)

    def restore(self, checkpoint: dict) -> None:
        # The parameters are views of flat_params: loading copies into them in place.
        self.model.load_state_dict(checkpoint["parent"])
        if checkpoint["optimizer"] is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self._share_optimizer_state()

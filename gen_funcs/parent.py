"""The parent model on the manager: its parameters, its optimizer and host buffers for the math."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from libe_cnn.config import TrainConfig
from libe_cnn.flat import copy_into, flatten_gradients, flatten_parameters, host_array, push_host_array
from libe_cnn.rundir import save_state_dict
from libe_cnn.strategies.base import reduce_in_order
from libe_cnn.wire import to_wire
from mnist.model import build_model, evaluate, make_optimizer


class ParentModel:
    """The parent model, its optimizer, and host buffers for gradients and parameters."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.model = build_model(cfg.seed, cfg.dropout, cfg.dataset).to(device)
        self.flat_params = flatten_parameters(self.model)
        self.flat_grad = flatten_gradients(self.model)
        on_cpu = device.type == "cpu"
        # On the CPU the math writes straight into the model's own buffers; on a GPU it
        # works on host copies, pushed to the device afterwards.
        self.host_grad = self.flat_grad.numpy() if on_cpu else np.empty(self.flat_grad.numel(), np.float32)
        self.host_params = host_array(self.flat_params)
        self.optimizer = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr)
        self.version = 0  # changes of the parameters so far: tells whether a saved state is current

    def params_for_wire(self) -> np.ndarray:
        return to_wire(self.flat_params, self.cfg.wire_dtype)

    def apply(self, grads: list[np.ndarray], mode: str) -> None:
        """Reduce float32 gradients (in the given order) and take one optimizer step."""
        reduce_in_order(grads, self.host_grad, mode)
        if self.device.type != "cpu":
            copy_into(self.flat_grad, self.host_grad)
        self.optimizer.step()
        self.version += 1

    def host_params_changed(self) -> None:
        """Push host_params, just changed by the aggregation math, into the model."""
        push_host_array(self.flat_params, self.host_params)
        self.version += 1

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        return evaluate(self.model, images, labels)

    def save(self, path: Path) -> None:
        save_state_dict(path, self.model)

    def restore(self, checkpoint: dict) -> None:
        # The parameters are views of flat_params: loading copies into them in place.
        self.model.load_state_dict(checkpoint["parent"])
        if checkpoint["optimizer"] is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])

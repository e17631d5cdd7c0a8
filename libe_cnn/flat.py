"""Model parameters and gradients as views into one contiguous buffer each.

One buffer means one store transfer per direction per step instead of one per tensor,
and no gather/scatter copies around it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _point_into(flat: torch.Tensor, params: list[nn.Parameter], attribute: str) -> None:
    """Set `attribute` ("data" or "grad") of each parameter to its slice of `flat`."""
    offset = 0
    for p in params:
        n = p.numel()
        setattr(p, attribute, flat[offset : offset + n].view_as(p))
        offset += n


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """Move every parameter into one flat tensor and make the parameters views of it."""
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    _point_into(flat, params, "data")
    return flat


def flatten_gradients(model: nn.Module) -> torch.Tensor:
    """Give every parameter a .grad that is a view of one zeroed flat tensor.

    Backward accumulates in place into an existing .grad, so after `flat.zero_()` and
    `loss.backward()` the flat tensor holds the whole gradient with no copy. (Never call
    `optimizer.zero_grad()` on such a model: it would replace the views with None.)
    """
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    _point_into(flat, params, "grad")
    return flat


def host_array(flat: torch.Tensor) -> np.ndarray:
    """A writable host array of `flat`: its own memory on the CPU, a copy of it on a GPU.

    The aggregation math runs on host arrays; `push_host_array` brings a GPU tensor up to date.
    """
    return flat.detach().numpy() if flat.device.type == "cpu" else flat.detach().cpu().numpy()


def push_host_array(flat: torch.Tensor, host: np.ndarray) -> None:
    """Copy a changed `host_array(flat)` back into `flat` (nothing to do on the CPU: same memory)."""
    if flat.device.type != "cpu":
        copy_into(flat, host)


def copy_into(flat: torch.Tensor, array: np.ndarray) -> None:
    """Copy a (possibly read-only) numpy buffer into a flat tensor on any device."""
    if array.shape != (flat.numel(),):
        raise ValueError(f"buffer of shape {array.shape} does not fit a model of {flat.numel()} parameters")
    if flat.device.type == "cpu":
        flat.numpy()[:] = array
    else:
        flat.copy_(torch.from_numpy(np.array(array)))


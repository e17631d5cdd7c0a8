"""The networks, defined once for the standalone trainer, the generator and the simulators.

With --model cnn the dataset chooses the network: the CNN for the 28 x 28 MNIST family, a deeper
CNN for CIFAR-10's 3 x 32 x 32 colour images, a small MLP for Iris's four measurements.
--model resnet18 and resnet18-narrow are ResNet-18 for the small images (`ResNet18`), with
GroupNorm instead of BatchNorm so that micro-batches and shards compute what one batch would.

Every network is also a chain of layers (`layers()`), the units a pipeline cuts into stages:
running them one after the other is the network's forward, bit for bit, and their parameters,
in order, are the network's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Apply(nn.Module):
    """A parameter-free step of a forward (an activation, a pooling, a flatten) as a module."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, 1)


def max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(x, dim=1)


def chain(*steps: nn.Module | object) -> nn.Sequential:
    """One layer from modules and parameter-free functions, applied in order."""
    return nn.Sequential(*(s if isinstance(s, nn.Module) else Apply(s) for s in steps))


class Net(nn.Module):
    """conv(1->32) -> conv(32->64) -> max-pool -> fc(9216->128) -> fc(128->10), log-softmax out."""

    def __init__(self, dropout: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25 if dropout else 0.0)
        self.dropout2 = nn.Dropout(0.5 if dropout else 0.0)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)

    def layers(self) -> list[nn.Module]:
        return [chain(self.conv1, relu), chain(self.conv2, relu, max_pool, self.dropout1, flatten),
                chain(self.fc1, relu, self.dropout2), chain(self.fc2, log_softmax)]


class CifarNet(nn.Module):
    """Two blocks of conv-conv-pool (3->32->32, 32->64->64) -> fc(4096->256) -> fc(256->10)."""

    def __init__(self, dropout: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.dropout1 = nn.Dropout(0.25 if dropout else 0.0)
        self.dropout2 = nn.Dropout(0.5 if dropout else 0.0)
        self.fc1 = nn.Linear(64 * 8 * 8, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.dropout1(self.features(x)), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)

    def layers(self) -> list[nn.Module]:
        f = self.features
        return [chain(f[0], f[1]), chain(f[2], f[3], f[4]), chain(f[5], f[6]),
                chain(f[7], f[8], f[9], self.dropout1, flatten), chain(self.fc1, relu, self.dropout2),
                chain(self.fc2, log_softmax)]


class IrisNet(nn.Module):
    """fc(4->16) -> fc(16->3): four measurements of a flower to its species."""

    def __init__(self, dropout: bool = True) -> None:  # too small to need dropout
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)

    def layers(self) -> list[nn.Module]:
        return [chain(self.fc1, relu), chain(self.fc2, log_softmax)]


# GroupNorm, not BatchNorm: BatchNorm's statistics depend on the batch, so a pipeline's
# micro-batches and the data-parallel shards would each normalise with other statistics than
# one process on the whole batch, and its running statistics are buffers, which the trainer
# does not exchange (only parameters travel). GroupNorm normalises each sample on its own.
NORM_GROUPS = 8  # every width (16 ... 512) divides into 8 groups: 2 to 64 channels each


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


def global_pool(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, 1)


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm plus the shortcut (a 1x1 conv and norm where the shape changes), relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv3x3(cin, cout, stride), norm(cout)
        self.conv2, self.norm2 = conv3x3(cout, cout), norm(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016) for small images, as usual for CIFAR, with GroupNorm.

    A 3x3 stride-1 stem conv (no max-pool), then BasicBlocks [2, 2, 2, 2] at widths w, 2w, 4w,
    8w (stride 2 and a 1x1 projection shortcut at the first block of stages 2-4), adaptive
    average pool to 1x1, fc to `classes`, log-softmax. w = 64 is the standard ResNet-18
    (11.17 M parameters on 3 x 32 x 32), w = 16 the narrow one for CPUs.

    Every norm is GroupNorm (Wu and He, 2018) with NORM_GROUPS = 8 groups, not BatchNorm:
    BatchNorm's statistics depend on the batch, so a pipeline's micro-batches and the
    data-parallel shards would each compute other statistics than one process on the whole
    batch, and its running statistics would be buffers the trainer does not exchange (only
    parameters travel). GroupNorm is per sample: micro-batching and sharding leave the math
    unchanged, and the network has no buffers. No dropout (`dropout` is accepted and ignored).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, classes: int = 10, dropout: bool = True) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv3x3(in_channels, width), norm(width)
        blocks, cin = [], width
        for stage in range(4):
            cout = width * 2**stage
            for i in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():  # He initialization of the convolutions, as torchvision's ResNet
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.norm1(self.conv1(x))))
        return F.log_softmax(self.fc(torch.flatten(global_pool(x), 1)), dim=1)

    def layers(self) -> list[nn.Module]:
        """The stem, the 8 blocks, the head: 10 layers."""
        return [chain(self.conv1, self.norm1, relu), *self.blocks, chain(global_pool, flatten, self.fc, log_softmax)]


MODELS = {"mnist": Net, "fashion-mnist": Net, "cifar10": CifarNet, "iris": IrisNet}
RESNET_WIDTHS = {"resnet18": 64, "resnet18-narrow": 16}
IMAGE_CHANNELS = {"mnist": 1, "fashion-mnist": 1, "cifar10": 3}


def new_model(dataset: str = "mnist", model: str = "cnn", dropout: bool = True) -> nn.Module:
    """The network --model names for the dataset, with torch's current random state drawing its weights."""
    if dataset not in MODELS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(MODELS)}")
    if model == "cnn":
        return MODELS[dataset](dropout=dropout)
    if model not in RESNET_WIDTHS:
        raise ValueError(f"unknown model {model!r}: expected one of cnn, {', '.join(RESNET_WIDTHS)}")
    if dataset not in IMAGE_CHANNELS:
        raise ValueError(f"model {model} takes images: use it with {', '.join(IMAGE_CHANNELS)} (got {dataset})")
    return ResNet18(IMAGE_CHANNELS[dataset], RESNET_WIDTHS[model], dropout=dropout)


def build_model(seed: int, dropout: bool = True, dataset: str = "mnist", model: str = "cnn") -> nn.Module:
    """The model with its initial weights drawn from `seed` (same seed, same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_model(dataset, model, dropout)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int | None = None) -> tuple[float, float]:
    """Mean negative log-likelihood and accuracy (a fraction) on a labelled set."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # On CPU, batches of 128 stay in cache: 10000 Fashion-MNIST images took 4.8 s, not 8.3 s at 1000.
    batch_size = batch_size or (128 if device.type == "cpu" else 1024)
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        out = model(x)
        total_loss += F.nll_loss(out, y, reduction="sum").item()
        correct += (out.argmax(dim=1) == y).sum().item()
    model.train(was_training)
    return total_loss / len(labels), correct / len(labels)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    # Fused kernels update all parameters in one pass: Adam's step took 0.6 ms instead of
    # 1.7 ms here, time every simulator spends waiting.
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=True)
    raise ValueError(f"unknown optimizer {name!r}")


# Each optimizer's per-parameter state, in the order `optimizer_state_vector` packs it: a
# worker's optimizer travels to a checkpoint through the store as one plain float32 array.
OPTIMIZER_STATE = {"adam": ("step", "exp_avg", "exp_avg_sq"), "adadelta": ("step", "square_avg", "acc_delta"),
                   "sgd": ("momentum_buffer",)}


def optimizer_state_vector(optimizer: torch.optim.Optimizer, name: str) -> np.ndarray:
    """Every per-parameter state of an optimizer that has stepped, as one float32 vector."""
    parts = []
    for p in optimizer.param_groups[0]["params"]:
        state = optimizer.state[p]
        parts += [state[field].detach().reshape(-1).to("cpu", torch.float32) for field in OPTIMIZER_STATE[name]]
    return torch.cat(parts).numpy()


def load_optimizer_state_vector(optimizer: torch.optim.Optimizer, name: str, vector: np.ndarray) -> None:
    """Restore the state `optimizer_state_vector` packed (into an optimizer on the same model)."""
    params, fields = optimizer.param_groups[0]["params"], OPTIMIZER_STATE[name]
    size = sum(1 if field == "step" else p.numel() for p in params for field in fields)
    if len(vector) != size:
        raise ValueError(f"an optimizer state of {len(vector)} values does not fit {name} on this model ({size})")
    state, offset = {}, 0
    for i, p in enumerate(params):
        state[i] = {}
        for field in fields:
            n = 1 if field == "step" else p.numel()
            part = torch.from_numpy(np.array(vector[offset : offset + n], dtype=np.float32))
            state[i][field] = part.reshape(()) if field == "step" else part.view_as(p)
            offset += n
    # load_state_dict puts each tensor where this optimizer keeps it (device, dtype).
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})

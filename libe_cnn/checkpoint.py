"""checkpoint.pt: everything a stopped run needs to continue where it was.

The generator writes it (atomically) every --checkpoint-every steps, at each epoch end and
when the run ends or is interrupted, and `--resume RUN_DIR` reads it back. Besides the
parent model it holds what the next steps depend on:

    step, epoch, samples   where the run is
    positions              each worker's next batch; with the seed this fixes the data order
                           (mnist.data.BatchOrder) and the dropout masks (mnist.data.dropout_seed)
    optimizer              the generator's optimizer (strategies in which it applies gradients)
    workers                each worker's parameters and optimizer state, one float32 vector
                           each (strategies in which workers keep their own)
    counters               the strategy's running totals (its Counters: libe_cnn/strategies)
    rng                    the seed and the manager's torch generator state
    metrics_lines          how much of metrics.jsonl describes steps up to here
"""

from __future__ import annotations

from pathlib import Path

import torch

from libe_cnn.errors import UserError
from libe_cnn.rundir import atomic_write

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def save_checkpoint(run_dir: Path, state: dict) -> None:
    atomic_write(Path(run_dir) / CHECKPOINT, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(run_dir: Path) -> dict:
    """The run's checkpoint, on the CPU; a missing or unreadable one is a UserError."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise UserError(f"cannot resume {run_dir}: it has no {CHECKPOINT} (the run stopped before its first "
                        "checkpoint; start it again)")
    try:
        # weights_only: tensors and plain containers only; nothing in the file can run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a damaged file
        raise UserError(f"cannot resume {run_dir}: {path} is unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"cannot resume {run_dir}: {path} is not a checkpoint of format {FORMAT}")
    return state

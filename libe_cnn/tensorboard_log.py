"""--tensorboard DIR: the numbers of metrics.jsonl as TensorBoard scalars, where users already watch.

Step records go under train/ (loss, samples, samples_per_s, the per-step breakdown...),
evaluations under eval/ (test_loss, test_accuracy...), each at its step. A resumed run purges
the events after its checkpoint's step, as it cuts metrics.jsonl there: those steps are
taken again.
"""

from __future__ import annotations

from numbers import Real


class TensorBoardLog:
    def __init__(self, log_dir: str, resumed_at: int) -> None:
        # Optional (pip install 'libe-cnn[tensorboard]'): imported only when asked for.
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides the events already written at purge_step and after.
        self.writer = SummaryWriter(log_dir, purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, record: dict) -> None:
        event = record.get("event")
        if event not in (None, "eval"):
            return
        group = "eval" if event == "eval" else "train"
        for name, value in record.items():
            if isinstance(value, Real) and not isinstance(value, bool) and name != "step":
                self.writer.add_scalar(f"{group}/{name}", value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()

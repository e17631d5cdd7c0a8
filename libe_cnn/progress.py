"""One progress line on the manager: step, loss, last accuracy, samples/s."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_steps: int, stream=sys.stderr, every_s: float = 10.0, unit: str = "step") -> None:
        self.total = total_steps
        self.unit = unit  # what one step counts: a batch on every worker, or (async) one gradient
        self.stream = stream
        self.tty = stream.isatty()
        # Off a terminal, print a plain line now and then instead of redrawing one.
        self.every_s = 0.1 if self.tty else every_s
        self._last = 0.0

    def update(self, step: int, epoch: int, loss: float, accuracy: float | None, samples_per_s: float) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and step != self.total:
            return
        self._last = now
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        acc = f"{accuracy:6.2%}" if accuracy is not None else "   -  "
        line = (f"[{bar}] {self.unit} {step}/{self.total} epoch {epoch + 1} "
                f"loss {loss:.4f} acc {acc} {samples_per_s:7.0f} samples/s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()

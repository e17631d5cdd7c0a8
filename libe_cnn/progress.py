"""One progress line on the manager: step, epoch, loss, last accuracy, samples/s, elapsed time and ETA.

On a terminal it is a tqdm bar, redrawn in place, with the run's messages (evaluations)
printed above it. Elsewhere (a batch job's log, a pipe) a redrawn bar would pile up as one
line of carriage returns, so a plain line is written every `every_s` seconds instead, with
the same elapsed time and ETA.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total_steps: int, stream=sys.stderr, every_s: float = 10.0, unit: str = "step",
                 done: int = 0) -> None:
        self.total = total_steps
        self.unit = unit  # what one step counts: a batch on every worker, or (async) one gradient
        self.stream = stream
        self.every_s = every_s
        # The ETA counts from where this process started (a resumed run: its checkpoint).
        self._first, self._start, self._last = done, time.monotonic(), 0.0
        self.bar = tqdm(total=total_steps, initial=done, unit=unit, file=stream, dynamic_ncols=True,
                        mininterval=0.1, leave=True) if stream.isatty() else None

    def update(self, step: int, epoch: int, loss: float, accuracy: float | None, samples_per_s: float) -> None:
        acc = f"{accuracy:.2%}" if accuracy is not None else "-"
        about = f"epoch {epoch + 1} loss {loss:.4f} acc {acc} {samples_per_s:.0f} samples/s"
        if self.bar is not None:
            self.bar.set_postfix_str(about, refresh=False)
            self.bar.update(step - self.bar.n)
            if step == self.total:
                self.bar.close()
            return
        now = time.monotonic()
        if now - self._last < self.every_s and step != self.total:
            return
        self._last = now
        self.stream.write(f"{self.unit} {step}/{self.total} {about}, {self.times(step, now)}\n")
        self.stream.flush()

    def times(self, step: int, now: float) -> str:
        """'elapsed H:MM:SS, ETA H:MM:SS' at `step`, at the pace since this process started."""
        elapsed = now - self._start
        done = step - self._first
        eta = tqdm.format_interval(elapsed / done * (self.total - step)) if done > 0 else "?"
        return f"elapsed {tqdm.format_interval(elapsed)}, ETA {eta}"

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)  # above the bar, which is redrawn below it
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

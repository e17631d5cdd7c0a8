"""The progress line: elapsed time and ETA on a log, a tqdm bar on a terminal, messages above it."""

from __future__ import annotations

import io

from libe_cnn import progress
from libe_cnn.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_with_elapsed_time_and_eta_at_the_pace_so_far(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    log = io.StringIO()
    p = Progress(100, stream=log, every_s=10.0)
    clock.now += 60
    p.update(25, 0, 0.5, None, 40.0)  # a quarter in a minute: three more to go
    clock.now += 1
    p.update(26, 0, 0.5, None, 40.0)  # within every_s: not written
    clock.now += 59
    p.update(50, 1, 0.25, 0.875, 40.0)
    lines = log.getvalue().splitlines()
    assert lines == ["step 25/100 epoch 1 loss 0.5000 acc - 40 samples/s, elapsed 01:00, ETA 03:00",
                     "step 50/100 epoch 2 loss 0.2500 acc 87.50% 40 samples/s, elapsed 02:00, ETA 02:00"]
    assert "\r" not in log.getvalue()


def test_a_resumed_run_counts_its_pace_from_where_it_resumed(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    log = io.StringIO()
    p = Progress(100, stream=log, done=80)
    clock.now += 10
    p.update(90, 0, 0.5, None, 40.0)  # 10 steps in 10 s since resuming: 10 s left, not 1.1 s
    assert log.getvalue().endswith("elapsed 00:10, ETA 00:10\n")


def test_the_last_step_is_always_written():
    log = io.StringIO()
    p = Progress(3, stream=log)
    for step in (1, 2, 3):
        p.update(step, 0, 1.0, None, 1.0)
    assert [line.split(" epoch")[0] for line in log.getvalue().splitlines()] == ["step 1/3", "step 3/3"]


def test_a_terminal_gets_a_tqdm_bar_and_messages_above_it():
    term = Terminal()
    p = Progress(4, stream=term, unit="gradient")
    p.update(2, 0, 0.75, None, 123.0)
    p.message("epoch 1 gradient 2: test accuracy 50.00%")
    p.update(4, 0, 0.5, 0.5, 123.0)
    out = term.getvalue()
    assert "\r" in out and "4/4" in out and "gradient" in out and "epoch 1 loss 0.5000 acc 50.00% 123 samples/s" in out
    assert "epoch 1 gradient 2: test accuracy 50.00%\n" in out
    assert p.bar.n == 4

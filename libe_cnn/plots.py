"""Learning-curve figures of one or more run directories, with the plotted data beside each PNG."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, no interactive backend
from matplotlib.ticker import MaxNLocator

from libe_cnn.errors import UserError
from libe_cnn.rundir import atomic_write

# Config fields that differ between runs without changing how they trained or what their curves
# measure: where the run and its data live, its names, how it was started (resume), what else it
# wrote (TensorBoard events, checkpoints), how often it evaluated (the points show that), and how
# it reached its Redis. How many Redis servers, and on which hosts, is compared: it changes the
# wall time. So are the evaluation's test samples (--eval-subset, --limit-test): they change the accuracy.
IGNORED_FIELDS = ("run_dir", "run_id", "data_dir", "resume", "tensorboard", "checkpoint_every", "eval_every",
                  "redis_host", "redis_port", "redis_bind", "redis_password", "redis_user", "redis_db",
                  "redis_tls", "redis_tls_options")
# In labels these come first, in this order; the other fields follow in config.json's order.
LEADING_FIELDS = ("strategy", "n_workers", "batch_size", "dataset")


@dataclass
class Run:
    """What the figure needs from one run directory."""

    run_dir: Path
    config: dict[str, Any]
    train_step: list[int] = field(default_factory=list)
    train_wall_s: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_wall_s: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)  # fraction 0..1, as in metrics.jsonl

    @property
    def smooth_window(self) -> int:
        """About 2% of the run, at least 5 steps: a visible trend on short and long runs alike."""
        return max(5, len(self.train_loss) // 50)

    @property
    def smoothed_loss(self) -> list[float]:
        return smooth(self.train_loss, self.smooth_window)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a final line cut short by a killed run is dropped."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text: is this a metrics file of libe-cnn?") from None
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path} line {number} is not valid JSON: the file is damaged; "
                            "remove that line or plot another run") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number} is not a JSON object: is this a metrics file of libe-cnn?")
        records.append(record)
    return records


def _finite(record: dict[str, Any], key: str) -> float | None:
    """The record's number under `key`, or None when it is missing, not a number, NaN or inf."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist: give the directory a training run wrote")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory: give the directory a training run wrote")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl: is it a run directory, and did the run start training?")
    records = read_metrics(metrics)
    if not records:
        raise UserError(f"{metrics} has no records yet: wait for the run's first step, or plot another run")

    config_path = run_dir / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e}): restore it or remove it") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object: restore it or remove it")

    run = Run(run_dir=run_dir, config=config)
    for record in records:
        step, wall_s = _finite(record, "step"), _finite(record, "wall_s")
        if step is None or wall_s is None:
            continue
        if record.get("event") == "eval":
            accuracy = _finite(record, "test_accuracy")
            if accuracy is not None:
                run.eval_step.append(int(step))
                run.eval_wall_s.append(wall_s)
                run.eval_accuracy.append(accuracy)
        elif "event" not in record:
            loss = _finite(record, "loss")  # a diverged step logs NaN: nothing to draw
            if loss is not None:
                run.train_step.append(int(step))
                run.train_wall_s.append(wall_s)
                run.train_loss.append(loss)
    return run


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing running mean over the last `window` points (fewer at the start).

    A trailing mean, unlike a centred one, never uses steps the run had not taken yet.
    """
    if not values:
        return []
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return ((sums[ends] - sums[starts]) / (ends - starts)).tolist()


def settings_label(config: dict[str, Any], fallback: str) -> str:
    """A short description such as `sync, 4 workers x 64, fashion-mnist`; missing fields are left out."""
    parts = []
    if config.get("strategy"):
        parts.append(str(config["strategy"]))
    n_workers, batch_size = config.get("n_workers"), config.get("batch_size")
    if n_workers is not None:
        workers = f"{n_workers} worker{'' if n_workers == 1 else 's'}"
        parts.append(workers if batch_size is None else f"{workers} x {batch_size}")
    if config.get("dataset"):
        parts.append(str(config["dataset"]))
    return ", ".join(parts) or fallback


def _compared(key: str) -> bool:
    return key not in IGNORED_FIELDS


def _filled(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the fields a run saved before they existed at the value that run trained with."""
    from libe_cnn.cli import ADDED_FIELDS  # the trainer's options: imported only for labels

    if not config:  # no config.json: nothing is known
        return config
    return {**config, **{k: v for k, v in ADDED_FIELDS.items() if k not in config}}


def _not_applicable(key: str, config: dict[str, Any]) -> bool:
    """Whether `key` is an option that the run's strategy or parallelism takes no version of."""
    from libe_cnn import strategies
    from libe_cnn.config import PIPELINE_DEFAULTS

    if key in PIPELINE_DEFAULTS:
        return config.get("parallelism", "data") == "data"
    if key in strategies.all_options():
        chosen = strategies.REGISTRY.get(config.get("strategy"))
        return chosen is not None and chosen.option(key) is None
    return False


def check_comparable(runs: list[Run]) -> None:
    """Refuse to overlay runs on different datasets: their losses and accuracies are not comparable."""
    first: dict[str, Run] = {}  # each dataset's first run
    for run in runs:
        if run.config.get("dataset"):
            first.setdefault(str(run.config["dataset"]), run)
    if len(first) > 1:
        named = ", ".join(f"{dataset} ({run.run_dir})" for dataset, run in first.items())
        raise UserError(f"cannot overlay runs on different datasets, {named}: their curves are not "
                        "comparable; plot each dataset's runs in their own figure")


def run_labels(runs: list[Run]) -> list[str]:
    """Legend labels: the config fields whose values differ between the runs, e.g. `strategy=easgd, n_workers=4`."""
    configs = [_filled(run.config) for run in runs]
    keys = list(dict.fromkeys([*LEADING_FIELDS, *(k for config in configs for k in config if _compared(k))]))
    differing = [k for k in keys if len({json.dumps(config.get(k), sort_keys=True) for config in configs}) > 1]
    # An option that does not apply to some of the runs (null there, like --sync-period of sync)
    # follows from their strategy or parallelism: name it only if nothing else tells them apart.
    # Any other null is a setting of its own (--limit-train not given: all samples) and is named.
    differing = [k for k in differing
                 if not any(c.get(k) is None and _not_applicable(k, c) for c in configs)] or differing
    if differing:
        labels = [", ".join(f"{k}={config.get(k)}" for k in differing) for config in configs]
    else:
        labels = [settings_label(run.config, run.run_dir.name) for run in runs]
    if len(set(labels)) < len(labels):  # same settings: only the directory tells the runs apart
        labels = [f"{label} ({run.run_dir.name})" for label, run in zip(labels, runs)]
    return labels


def draw(runs: list[Run], labels: list[str]) -> Figure:
    """Four panels: training loss and test accuracy, each against step and against wall time."""
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    (loss_step, loss_wall), (acc_step, acc_wall) = fig.subplots(2, 2)
    for i, (run, label) in enumerate(zip(runs, labels)):
        colour = f"C{i % 10}"
        smoothed = run.smoothed_loss
        for ax, x in ((loss_step, run.train_step), (loss_wall, run.train_wall_s)):
            ax.plot(x, run.train_loss, color=colour, alpha=0.3, linewidth=0.8)
            # Labelled once: the figure's legend collects labels from every panel.
            ax.plot(x, smoothed, color=colour, linewidth=1.8, label=label if ax is loss_step else None)
        percent = [100 * a for a in run.eval_accuracy]
        for ax, x in ((acc_step, run.eval_step), (acc_wall, run.eval_wall_s)):
            ax.plot(x, percent, color=colour, marker="o", markersize=4, linewidth=1.8)

    loss_step.set(title="Training loss vs step (light: per step, dark: running mean)", xlabel="step", ylabel="loss")
    loss_wall.set(title="Training loss vs wall time", xlabel="wall time (s)", ylabel="loss")
    acc_step.set(title="Test accuracy vs step", xlabel="step", ylabel="accuracy (%)")
    acc_wall.set(title="Test accuracy vs wall time", xlabel="wall time (s)", ylabel="accuracy (%)")
    for ax in (loss_step, acc_step):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5
    for ax in (loss_step, loss_wall, acc_step, acc_wall):
        ax.grid(alpha=0.3)
    if not any(run.eval_step for run in runs):
        for ax in (acc_step, acc_wall):
            ax.text(0.5, 0.5, "no evaluations yet", transform=ax.transAxes, ha="center", va="center", color="grey")

    title = runs[0].run_dir.name if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(f"Learning curves: {title}")
    # As many columns as fit the figure's width, so long labels wrap into rows instead of off the edge.
    ncols = max(1, min(len(runs), 120 // (max(map(len, labels)) + 8)))
    fig.legend(loc="outside lower center", ncols=ncols, frameon=False)
    return fig


def curves_data(runs: list[Run], labels: list[str]) -> dict[str, Any]:
    """The data of the figure, so its numbers can be read without the picture."""
    return {
        "smoothing": "loss_smoothed: trailing running mean of the loss over the last smooth_window points",
        "units": {"wall_s": "seconds since the run started",
                  "test_accuracy": "fraction 0..1 (plotted as percent)"},
        "runs": [
            {
                "label": label,
                "run_dir": str(run.run_dir),
                "smooth_window": run.smooth_window,
                "train": {"step": run.train_step, "wall_s": run.train_wall_s, "loss": run.train_loss,
                          "loss_smoothed": run.smoothed_loss},
                "eval": {"step": run.eval_step, "wall_s": run.eval_wall_s, "test_accuracy": run.eval_accuracy},
            }
            for run, label in zip(runs, labels)
        ],
    }


# A run's own figure, and the records of a run that a figure's JSON could be named like (-o config.png).
RUN_FIGURE = ("curves.png", "curves.json")
RUN_RECORDS = ("config.json", "summary.json")


def is_run_dir(path: Path) -> bool:
    """A directory a training run wrote (or is writing)."""
    return (path / "metrics.jsonl").is_file() or (path / "config.json").is_file()


def check_output(run_dirs: list[Path], out: Path) -> None:
    """Refuse an output that would replace another run's figure, or any run's config.json or summary.json."""
    # Why: a run's curves.png/curves.json are the figure of that run alone, so only plotting that
    # one run may refresh them (as the trainer does at its end); an overlay belongs to no run.
    # Names compare in lower case: on a case-insensitive file system Curves.png is curves.png.
    parent = out.parent
    if not is_run_dir(parent):
        return
    own = len(run_dirs) == 1 and parent.resolve() == Path(run_dirs[0]).resolve()
    for target in (out, out.with_suffix(".json")):
        name = target.name.lower()
        if name in RUN_RECORDS or (name in RUN_FIGURE and not own):
            raise UserError(f"cannot write {target}: it would replace the {name} of run {parent}, "
                            "which is left alone; choose another output path")


def write_curves(run_dirs: list[Path], out: Path) -> None:
    """Plot the runs into `out` (PNG) and write the plotted data to `out` with suffix .json."""
    out = Path(out)
    if not run_dirs:
        raise UserError("no run directories to plot: give at least one")
    if out.suffix.lower() != ".png":
        raise UserError(f"the figure is written as PNG: name the output *.png (got {out})")
    # Runs before the output's directory: by default one run's figure goes inside it, and then
    # "run directory does not exist" is the error that helps.
    runs = [read_run(Path(d)) for d in run_dirs]
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist; create it first")
    check_output(run_dirs, out)
    check_comparable(runs)
    labels = run_labels(runs)
    data = json.dumps(curves_data(runs, labels), indent=1, allow_nan=False) + "\n"
    fig = draw(runs, labels)
    try:
        # The data first: a PNG on disk always has its JSON beside it.
        atomic_write(out.with_suffix(".json"), lambda f: f.write(data), binary=False)
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    except OSError as e:  # named after `out`, not the temporary file the error is about
        raise UserError(f"cannot write {out}: {e.strerror or e}; choose another output path") from None

"""Optimizer steps to a target test accuracy against the global batch size.

    python benchmarks/batch_scaling.py
    python benchmarks/batch_scaling.py --batch-sizes 64 256 1024 --lrs 1e-3 4e-3 --target 0.85
    python benchmarks/batch_scaling.py --report-only        # redraw from the saved JSON

The question of Shallue et al., "Measuring the Effects of Data Parallelism on Neural
Network Training" (JMLR 2019, arXiv:1811.03600): as the global batch grows, do the
optimizer steps needed to reach a result fall in proportion (perfect scaling), fall less
and less (diminishing returns), or stop falling (maximal data parallelism)?

Why one process. Synchronous data parallelism with the mean of N workers' gradients takes
exactly the optimizer steps of one process training on the union of their batches (the
parity test in tests/integration/test_trainer.py holds the trainer to this), and steps to
a target do not depend on wall time. So every run here is one process on all cores,
training on the global batch B: the same CNN, initial weights, optimizer, data order
(`run_libe_cnn.py -n 1 --batch-size B`: the seeded epoch order of shard 0 of 1, the last
partial batch of an epoch left out) and per-batch dropout seeds as the trainer. It
stands for `run_libe_cnn.py -n N --batch-size B/N --reduce mean` for any N; which samples
share a batch differs, not the distribution of the batches. The result does not move with
the machine's load, only the time it takes.

Optimizer and learning rates. Adam, the trainer's default, with the learning rate tuned
per batch size on the doublings {1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2} (--lrs), as the
paper tunes the learning rate (and momentum) per batch size. Adam rather than SGD with
momentum: it is what the trainer runs by default, and its best lr moves less with the
batch (a square-root rule is usual for Adam, Malladi et al. 2022, against a linear one for
SGD, Goyal et al. 2017), so six doublings from the trainer's 1e-3 span 32 to 4096
samples. Below 1e-3 the smallest batch only got slower (5e-4 took 608 steps at B=32,
1e-3 took 544).

The search. Batch sizes run from small to large. Each starts at the previous batch
size's best lr (the smallest lr for the first), then walks up the grid while each lr
reaches the target in strictly fewer steps than the best so far; if not even the first
step up did better, it walks down from the start the same way. This line search
assumes steps to target have a single minimum over the lr, and tries 2-3 lrs per batch
size instead of the whole grid. Every run after the first is cut once it has taken as
many steps as the best so far without reaching the target: it cannot win, and is
recorded as "pruned" with the steps it ran. The best run is kept (a tie, within the evaluation interval, keeps
the lr tried first); a best lr at either end of the grid is flagged, since a lr beyond it
might have done better. A run that does not reach the target within --max-epochs is "not
reached"; a run whose loss becomes NaN or infinite is "diverged".

Evaluation. Every `--eval-samples` training samples (1024: every 32 steps at B=32,
every step from B=1024 on) the model is evaluated on a fixed, seeded 2,000-image subset of
the test set; only when that is within 2 points of the target is it evaluated on the whole
10,000-image test set, and the target counts as reached only there. Steps to target are
therefore resolved to the evaluation interval: the first crossing lies after the previous
evaluation and at or before the recorded step; the JSON keeps both.

Writes batch-scaling.json (every run, with its evaluations), batch-scaling.md (tables) and
batch-scaling.png (log-log steps to target against batch size) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import report_saved, write_report  # noqa: E402
from libe_cnn.runtime import available_cores, set_threads  # noqa: E402
from mnist.data import BatchOrder, dropout_seed, load_shard, load_split, locate, read_idx  # noqa: E402
from libe_cnn.plan import DatasetFiles  # noqa: E402
from mnist.model import build_model, evaluate, make_optimizer  # noqa: E402

STEM = "batch-scaling"
DEFAULT_BATCH_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
SCREEN_SIZE = 2000  # test images in the cheap screening evaluation
# A 2,000-image accuracy near 0.85 has a standard error of 0.8 points; 2 points is 2.5 of
# them, so a model whose full test accuracy reaches the target is almost never screened out.
SCREEN_MARGIN = 0.02
# Local log-log slope of steps against batch size between neighbouring batch sizes:
# -1 is perfect scaling, 0 no gain at all. The bounds split that range in half and leave
# a quarter on each side for the evaluation interval's resolution.
PERFECT_SLOPE = -0.75
MAXIMAL_SLOPE = -0.25


@dataclass(frozen=True)
class Settings:
    """What every run shares."""

    optimizer: str
    target: float
    max_epochs: int
    eval_samples: int
    seed: int


class TestSets:
    """The full test set and its fixed screening subset."""

    def __init__(self, files: DatasetFiles, seed: int, limit: int | None = None) -> None:
        self.x, self.y = load_split(files, train=False, limit=limit)
        pick = torch.from_numpy(np.random.default_rng([seed, 0x7E57]).permutation(len(self.y))[:SCREEN_SIZE])
        self.screen_x, self.screen_y = self.x[pick], self.y[pick]

    def check(self, model: torch.nn.Module, target: float) -> dict:
        """Screen on the subset; evaluate on the whole test set only when the subset is close."""
        _, screen = evaluate(model, self.screen_x, self.screen_y)
        point = {"screen_accuracy": screen, "test_accuracy": None}
        if screen >= target - SCREEN_MARGIN:
            _, point["test_accuracy"] = evaluate(model, self.x, self.y)
        return point


def eval_every(batch: int, eval_samples: int) -> int:
    """Steps between evaluations: about eval_samples training samples, at least one step."""
    return max(1, round(eval_samples / batch))


def train_to_target(x: torch.Tensor, y: torch.Tensor, tests: TestSets, s: Settings, batch: int, lr: float,
                    max_steps: int) -> dict:
    """Train from the initial weights until the target or max_steps; the run's record."""
    model = build_model(s.seed).train()
    optimizer = make_optimizer(s.optimizer, model.parameters(), lr)
    per_epoch = len(y) // batch
    every = eval_every(batch, s.eval_samples)
    evaluations: list[dict] = []
    start = time.perf_counter()
    batches = BatchOrder(len(y), s.seed, 0, per_epoch, batch)  # the trainer's recipe, as its one worker
    stopped, steps_to_target, done = "budget", None, 0
    for step in range(max_steps):
        idx = torch.from_numpy(batches.positions(step))
        torch.manual_seed(dropout_seed(s.seed, 0, step))
        optimizer.zero_grad()
        loss = F.nll_loss(model(x[idx]), y[idx])
        if not math.isfinite(loss.item()):
            stopped = "diverged"
            break
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % every == 0 or done == max_steps:
            point = {"step": done, **tests.check(model, s.target)}
            evaluations.append(point)
            if point["test_accuracy"] is not None and point["test_accuracy"] >= s.target:
                stopped, steps_to_target = "target", done
                break
    previous = evaluations[-2]["step"] if stopped == "target" and len(evaluations) > 1 else 0
    return {"batch": batch, "lr": lr, "steps_to_target": steps_to_target,
            "previous_eval_step": previous if steps_to_target else None,
            "stopped": stopped, "steps_run": done, "eval_every": every,
            "wall_s": time.perf_counter() - start, "evaluations": evaluations}


def tune(x: torch.Tensor, y: torch.Tensor, tests: TestSets, s: Settings, batch: int, lrs: list[float],
         start: float) -> list[dict]:
    """Line search on the lr grid from `start`: up, or down if up did not help; runs cut at the best so far."""
    budget = s.max_epochs * (len(y) // batch)
    runs: list[dict] = []

    def improves(lr: float) -> bool:
        """Run one lr; whether it reached the target in fewer steps than every run before it."""
        best = min((r["steps_to_target"] for r in runs if r["steps_to_target"] is not None), default=None)
        cap = budget if best is None else best
        run = train_to_target(x, y, tests, s, batch, lr, cap)
        if run["stopped"] == "budget" and cap < budget:
            run["stopped"] = "pruned"
        runs.append(run)
        reached = f"target at step {run['steps_to_target']}" if run["steps_to_target"] else run["stopped"]
        print(f"  batch {batch} lr {lr:g}: {reached} ({run['steps_run']} steps, {run['wall_s']:.0f} s)",
              file=sys.stderr)
        return run["steps_to_target"] is not None and (best is None or run["steps_to_target"] < best)

    improves(start)
    went_up = False
    for lr in sorted(lr for lr in lrs if lr > start):
        if not improves(lr):
            break
        went_up = True
    # The optimum lies above the start if a larger lr did better: nothing below can win.
    if not went_up:
        for lr in sorted((lr for lr in lrs if lr < start), reverse=True):
            if not improves(lr):
                break
    return runs


def best_runs(runs: list[dict], batch_sizes: list[int], lrs: list[float]) -> list[dict]:
    """Per batch size, the run with the fewest steps to target (the first tried on a tie), or None."""
    out = []
    for batch in batch_sizes:
        reached = [r for r in runs if r["batch"] == batch and r["steps_to_target"] is not None]
        best = min(reached, key=lambda r: r["steps_to_target"]) if reached else None
        out.append({"batch": batch, "lr": best and best["lr"],
                    "steps_to_target": best and best["steps_to_target"],
                    "previous_eval_step": best and best["previous_eval_step"],
                    "lr_at_grid_edge": best is not None and best["lr"] in (min(lrs), max(lrs))})
    return out


def regimes(best: list[dict]) -> list[dict]:
    """The local log-log slope between neighbouring batch sizes that both reached the target."""
    points = [b for b in best if b["steps_to_target"] is not None]
    out = []
    for a, b in zip(points, points[1:]):
        slope = math.log(b["steps_to_target"] / a["steps_to_target"]) / math.log(b["batch"] / a["batch"])
        regime = ("perfect scaling" if slope <= PERFECT_SLOPE else
                  "maximal data parallelism" if slope >= MAXIMAL_SLOPE else "diminishing returns")
        out.append({"from_batch": a["batch"], "to_batch": b["batch"], "slope": slope, "regime": regime})
    return out


REGIME_COLORS = {"perfect scaling": "tab:green", "diminishing returns": "tab:orange",
                 "maximal data parallelism": "tab:red"}


def plot(result: dict, path: Path) -> None:
    """Left: best steps to target with the perfect-scaling line; right: every lr of the grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no interactive backend
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    cfg, best, runs = result["settings"], result["best"], result["runs"]
    fig = Figure(figsize=(12, 5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    reached = [b for b in best if b["steps_to_target"] is not None]
    missing = [b for b in best if b["steps_to_target"] is None]
    if reached:
        b0 = reached[0]
        xs = [b["batch"] for b in best]
        left.plot(xs, [b0["steps_to_target"] * b0["batch"] / x for x in xs], "k--", lw=1,
                  label="perfect scaling (through the smallest batch)")
        for seg in result["regimes"]:
            a = next(b for b in reached if b["batch"] == seg["from_batch"])
            b = next(b for b in reached if b["batch"] == seg["to_batch"])
            left.plot([a["batch"], b["batch"]], [a["steps_to_target"], b["steps_to_target"]], lw=3,
                      color=REGIME_COLORS[seg["regime"]], solid_capstyle="round")
            mid_x = math.sqrt(a["batch"] * b["batch"])
            mid_y = math.sqrt(a["steps_to_target"] * b["steps_to_target"])
            left.annotate(f"{seg['slope']:.2f}", (mid_x, mid_y), textcoords="offset points", xytext=(4, 6),
                          fontsize=8)
        lower = [b["steps_to_target"] - b["previous_eval_step"] for b in reached]
        left.errorbar([b["batch"] for b in reached], [b["steps_to_target"] for b in reached],
                      yerr=[[d - 1 for d in lower], [0] * len(reached)], fmt="o", color="k", ms=5,
                      capsize=3, zorder=3, label="steps to target (bar: evaluation interval)")
    for regime, color in REGIME_COLORS.items():
        if any(seg["regime"] == regime for seg in result["regimes"]):
            left.plot([], [], lw=3, color=color, label=regime)
    if missing:
        ceiling = [cfg["max_epochs"] * (result["n_train"] // b["batch"]) for b in missing]
        left.scatter([b["batch"] for b in missing], ceiling, marker="^", color="tab:red", zorder=3,
                     label=f"not reached in {cfg['max_epochs']} epochs (at the budget)")
    left.set_title(f"Steps to {cfg['target']:.0%} test accuracy, best lr per batch", fontsize=10)
    right.set_title(f"Every learning rate ({cfg['optimizer']})", fontsize=10)
    for lr in sorted({r["lr"] for r in runs}):
        mine = sorted((r for r in runs if r["lr"] == lr), key=lambda r: r["batch"])
        hit = [r for r in mine if r["steps_to_target"] is not None]
        line, = right.plot([r["batch"] for r in hit], [r["steps_to_target"] for r in hit], "o-", ms=4,
                           label=f"lr {lr:g}")
        cut = [r for r in mine if r["steps_to_target"] is None]
        # Drawn a little above the steps it ran: it needed more than that, if it got there at all.
        right.scatter([r["batch"] for r in cut], [1.08 * max(r["steps_run"], 1) for r in cut], marker="^",
                      s=18, facecolors="none", edgecolors=line.get_color(), zorder=3)
    right.scatter([], [], marker="^", s=18, facecolors="none", edgecolors="0.4",
                  label="stopped before the target:\nmore than the steps it ran")
    batches = [b["batch"] for b in best]
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())
        # Plain step counts at 1, 2, 5 x 10^k: readable where the data span less than a decade.
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("global batch size (samples per optimizer step)")
        ax.set_ylabel("optimizer steps")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    # The best lr of each batch size under its tick on the left.
    left.set_xticks(batches, [f"{b['batch']}\n" + (f"lr {b['lr']:g}" if b["lr"] else "-") for b in best])
    fig.suptitle(f"Fashion-MNIST CNN, {cfg['optimizer']}, lr tuned per batch; evaluated every "
                 f"~{cfg['eval_samples']} samples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    cfg = result["settings"]
    lrs = sorted(set(result["args"]["lrs"]))
    lines = [f"Optimizer steps to {cfg['target']:.0%} Fashion-MNIST test accuracy ({cfg['optimizer']}, lr tuned "
             f"per batch on {', '.join(f'{lr:g}' for lr in lrs)}; at most {cfg['max_epochs']} epochs of "
             f"{result['n_train']} samples; evaluated every ~{cfg['eval_samples']} samples). A step count s "
             "means the target was first reached after the previous evaluation and at or before step s.", "",
             "| global batch | best lr | steps to target | resolution (steps) | samples to target | "
             + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "| ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(lrs)]
    for b in result["best"]:
        cells = [str(b["batch"])]
        if b["steps_to_target"] is None:
            cells += ["-", "not reached", "-", "-"]
        else:
            cells += [f"{b['lr']:g}" + (" *" if b["lr_at_grid_edge"] else ""), str(b["steps_to_target"]),
                      str(b["steps_to_target"] - b["previous_eval_step"]), str(b["steps_to_target"] * b["batch"])]
        for lr in lrs:
            run = next((r for r in result["runs"] if r["batch"] == b["batch"] and r["lr"] == lr), None)
            cells.append("" if run is None else str(run["steps_to_target"]) if run["steps_to_target"]
                         else f"{run['stopped']} ({run['steps_run']})")
        lines.append("| " + " | ".join(cells) + " |")
    if result["regimes"]:
        lines += ["", "Local log-log slope of steps against batch size (-1: perfect scaling, 0: no gain); "
                  f"the regime: perfect scaling at {PERFECT_SLOPE} or below, maximal data parallelism at "
                  f"{MAXIMAL_SLOPE} or above, diminishing returns between:", "",
                  "| batch sizes | slope | regime |", "| --- | ---: | --- |"]
        lines += [f"| {seg['from_batch']} -> {seg['to_batch']} | {seg['slope']:.2f} | {seg['regime']} |"
                  for seg in result["regimes"]]
    lines += ["", "Cells per lr: steps to target, or how the run stopped and after how many steps "
              "(pruned: cut at the best run's steps without reaching the target); empty: not tried "
              "(the line search stopped before it)."]
    if any(b["lr_at_grid_edge"] for b in result["best"]):
        lines += ["", "\\* the best lr is at an end of the grid: a lr beyond it might take fewer steps."]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES),
                   help="global batch sizes (default: %(default)s)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                   help="learning rates tried per batch size (default: %(default)s)")
    p.add_argument("--optimizer", choices=("adam", "sgd", "adadelta"), default="adam",
                   help="sgd uses momentum 0.9 (default: %(default)s)")
    p.add_argument("--target", type=float, default=0.85, help="test accuracy (default: %(default)s)")
    p.add_argument("--max-epochs", type=int, default=10, help="budget per run (default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=1024,
                   help="training samples between evaluations, at least one step (default: %(default)s)")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first K samples only")
    p.add_argument("--limit-test", type=int, default=None,
                   help="test on the first K test samples only (the screening subset is drawn from them)")
    p.add_argument("--seed", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the results")
    p.add_argument("--report-only", action="store_true",
                   help="redraw the tables and figure from the saved JSON, without training")
    args = p.parse_args()
    too_small = args.limit_test is not None and args.limit_test < 1
    if min(args.batch_sizes) < 1 or args.max_epochs < 1 or args.eval_samples < 1 or too_small:
        p.error("--batch-sizes, --max-epochs, --eval-samples and --limit-test must be at least 1")
    if min(args.lrs) <= 0:
        p.error("--lrs must be positive")
    if not 0 < args.target < 1:
        p.error(f"--target must be a fraction between 0 and 1 (got {args.target})")
    if args.limit_train is not None and args.limit_train < max(args.batch_sizes):
        p.error(f"--limit-train {args.limit_train} is smaller than the largest batch {max(args.batch_sizes)}")
    return args


def main() -> None:
    args = parse_args()
    data = Path(args.out) / f"{STEM}.json"
    if args.report_only:
        print(report_saved(data, markdown, plot))
        return

    cores = available_cores()
    set_threads(cores)
    files = locate("fashion-mnist", None)
    n_train = args.limit_train or len(read_idx(files.paths["train_labels"]))
    # Shard 0 of 1: the trainer's data with one worker (its shards are sorted index sets).
    x, y = load_shard(files, n_train, 1, 0, args.seed)
    tests = TestSets(files, args.seed, args.limit_test)
    s = Settings(args.optimizer, args.target, args.max_epochs, args.eval_samples, args.seed)
    batch_sizes, lrs = sorted(set(args.batch_sizes)), sorted(set(args.lrs))

    runs: list[dict] = []
    start_lr, began = lrs[0], time.perf_counter()
    for batch in batch_sizes:
        print(f"batch {batch} ...", file=sys.stderr)
        mine = tune(x, y, tests, s, batch, lrs, start_lr)
        runs += mine
        start_lr = best_runs(mine, [batch], lrs)[0]["lr"] or start_lr
    best = best_runs(runs, batch_sizes, lrs)
    result = {"args": vars(args), "settings": asdict(s) | {"screen_size": SCREEN_SIZE, "screen_margin": SCREEN_MARGIN},
              "n_train": n_train, "threads": cores, "wall_s": time.perf_counter() - began,
              "best": best, "regimes": regimes(best), "runs": runs}
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(result, indent=2) + "\n")
    print(write_report(data, markdown, plot))


if __name__ == "__main__":
    main()

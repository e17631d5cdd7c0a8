"""Speedup and parallel efficiency against the number of workers: the trainer and torch DDP.

    python benchmarks/speedup.py                                  # N = 1 2 4
    python benchmarks/speedup.py --workers 1 2 4 8 16 32          # on a bigger node
    python benchmarks/speedup.py --report-only                    # redraw from the saved JSON

For each N, two contenders train the same CNN on the same Fashion-MNIST shards and
batches with the same optimizer (Adam 1e-3) and thread budget (the cores split evenly, at
least one thread per worker, as in throughput.py):

- this tool: `run_libe_cnn.py -n N`, its samples/s read from its metrics records after
  the warm-up steps, evaluation time excluded (as throughput.py reads it);
- torch DDP over gloo with N processes.

and two ways to grow N:

- fixed global batch (--global-batch, 512): each worker takes 512/N samples a step
  (strong scaling: the optimizer sees the same steps, so speedup is time saved outright);
- fixed per-worker batch (--per-worker-batch, 128): the global batch is 128 x N
  (weak scaling: more samples per step; batch_scaling.py says what that costs in steps).

Speedup is samples/s relative to the smallest N measured of the same contender and mode
(N=1 by default), times that N; efficiency is speedup / N. Time per epoch is
60,000 / samples/s (the Fashion-MNIST training set at the measured rate; start-up and
evaluation not included). The timings move with other load on the machine: run it on a
quiet one. On 2 cores the curve flattens past 2 workers.

Writes speedup.json, speedup.md and speedup.png into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import Workload, ddp, report_saved, write_report  # noqa: E402
from benchmarks.throughput import ours  # noqa: E402
from libe_cnn.runtime import available_cores, threads_per_worker  # noqa: E402
from mnist.data import locate, read_idx  # noqa: E402

STEM = "speedup"
EPOCH_SAMPLES = 60_000  # the Fashion-MNIST training set
MODES = ("global", "per-worker")
CONTENDERS = ("ours", "ddp")
LABELS = {"ours": "ours (run_libe_cnn.py)", "ddp": "torch DDP (gloo)"}


def per_worker_batch(mode: str, n: int, global_batch: int, per_worker: int) -> int:
    return global_batch // n if mode == "global" else per_worker


def measure(contender: str, w: Workload, steps: int, warmup: int) -> float:
    """Steady samples/s of one contender on one workload."""
    if contender == "ours":
        return ours(w, steps, warmup, "float32", "auto")["samples_per_s"]
    return ddp(w, threads=threads_per_worker(available_cores(), w.n_workers), steps=steps,
               warmup=warmup)["samples_per_s"]


def add_ratios(rows: list[dict]) -> None:
    """Speedup and efficiency of each row against the smallest N of its contender and mode."""
    for row in rows:
        base = min((r for r in rows if r["contender"] == row["contender"] and r["mode"] == row["mode"]),
                   key=lambda r: r["n"])
        row["speedup"] = row["samples_per_s"] / base["samples_per_s"] * base["n"]
        row["efficiency"] = row["speedup"] / row["n"]


def plot(result: dict, path: Path) -> None:
    """Samples/s, speedup and efficiency against N, both contenders, both modes, with the ideal."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no interactive backend
    from matplotlib.ticker import NullLocator

    a, rows = result["args"], result["rows"]
    ns = sorted({r["n"] for r in rows})
    fig = Figure(figsize=(13, 4.3))
    FigureCanvasAgg(fig)
    rate_ax, speed_ax, eff_ax = fig.subplots(1, 3)
    colors = {"ours": "tab:blue", "ddp": "tab:orange"}
    styles = {"global": ("-", "o", f"global batch {a['global_batch']}"),
              "per-worker": ("--", "s", f"{a['per_worker_batch']} per worker")}
    speed_ax.plot(ns, ns, color="k", lw=1, ls=":", label="ideal")
    eff_ax.plot(ns, [1.0] * len(ns), color="k", lw=1, ls=":", label="ideal")
    for contender in CONTENDERS:
        for mode in MODES:
            mine = sorted((r for r in rows if r["contender"] == contender and r["mode"] == mode),
                          key=lambda r: r["n"])
            if not mine:
                continue
            ls, marker, what = styles[mode]
            style = dict(color=colors[contender], ls=ls, marker=marker, ms=5,
                         label=f"{LABELS[contender]}, {what}")
            xs = [r["n"] for r in mine]
            rate_ax.plot(xs, [r["samples_per_s"] for r in mine], **style)
            speed_ax.plot(xs, [r["speedup"] for r in mine], **style)
            eff_ax.plot(xs, [r["efficiency"] for r in mine], **style)
    rate_ax.set_ylabel("samples/s (steady)")
    speed_ax.set_ylabel(f"speedup (samples/s relative to N={ns[0]})")
    eff_ax.set_ylabel("efficiency (speedup / N)")
    eff_ax.set_ylim(0, max(1.1, max(r["efficiency"] for r in rows) * 1.05))
    rate_ax.set_ylim(bottom=0)
    speed_ax.set_ylim(bottom=0)
    for ax in (rate_ax, speed_ax, eff_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("workers N")
        ax.grid(alpha=0.3)
    speed_ax.legend(fontsize=7)
    fig.suptitle(f"Fashion-MNIST CNN, Adam, {a['steps']} measured steps per point, {result['cores']} cores "
                 "split evenly between the workers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"Steady throughput against workers N ({result['cores']} cores split evenly, Adam 1e-3, "
             f"{a['steps']} measured steps after {a['warmup']} warm-up steps). Time per epoch = "
             f"{EPOCH_SAMPLES} / samples/s. Speedup against the smallest N of the same contender and mode.", "",
             "| mode | contender | N | per-worker batch | global batch | threads per worker | samples/s | "
             "s per epoch | speedup | efficiency |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        mode = f"global {a['global_batch']}" if r["mode"] == "global" else f"{a['per_worker_batch']} per worker"
        lines.append(f"| {mode} | {LABELS[r['contender']]} | {r['n']} | {r['per_worker_batch']} | "
                     f"{r['global_batch']} | {r['threads_per_worker']} | {r['samples_per_s']:.0f} | "
                     f"{r['epoch_s']:.1f} | {r['speedup']:.2f} | {r['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="values of N (default: %(default)s)")
    p.add_argument("--global-batch", type=int, default=512,
                   help="fixed-global-batch mode: samples per step over all workers (default: %(default)s)")
    p.add_argument("--per-worker-batch", type=int, default=128,
                   help="fixed-per-worker-batch mode: samples per worker per step (default: %(default)s)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="(default: both)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), help="(default: both)")
    p.add_argument("--steps", type=int, default=40, help="measured steps per point (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the results")
    p.add_argument("--report-only", action="store_true",
                   help="redraw the table and figure from the saved JSON, without measuring")
    args = p.parse_args()
    if min(args.workers) < 1 or args.steps < 1 or args.warmup < 1:
        p.error("--workers, --steps and --warmup must be at least 1")
    if args.global_batch < 1 or args.per_worker_batch < 1:
        p.error("--global-batch and --per-worker-batch must be at least 1")
    if "global" in args.modes:
        bad = [n for n in args.workers if args.global_batch % n]
        if bad:
            p.error(f"--global-batch {args.global_batch} does not split evenly over N = {bad}")
    args.workers = sorted(set(args.workers))
    return args


def main() -> None:
    args = parse_args()
    data = Path(args.out) / f"{STEM}.json"
    if args.report_only:
        print(report_saved(data, markdown, plot))
        return

    files = locate("fashion-mnist", None)
    n_train = len(read_idx(files.paths["train_labels"]))
    cores = available_cores()
    rows = []
    for mode in args.modes:
        for n in args.workers:
            batch = per_worker_batch(mode, n, args.global_batch, args.per_worker_batch)
            w = Workload(files, n_train=n_train, n_workers=n, batch_size=batch)
            for contender in args.contenders:
                print(f"{mode}, N={n}, {batch} per worker: {contender} ...", file=sys.stderr)
                rate = measure(contender, w, args.steps, args.warmup)
                rows.append({"mode": mode, "contender": contender, "n": n, "per_worker_batch": batch,
                             "global_batch": batch * n, "threads_per_worker": threads_per_worker(cores, n),
                             "samples_per_s": rate, "epoch_s": EPOCH_SAMPLES / rate})
    add_ratios(rows)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps({"args": vars(args), "cores": cores, "rows": rows}, indent=2) + "\n")
    print(write_report(data, markdown, plot))


if __name__ == "__main__":
    main()

"""Every aggregation strategy on the same data, model and sample budget: a table and a plot.

    python benchmarks/compare_strategies.py -n 4 --epochs 1

Each strategy trains the same CNN from the same initial weights on the same shards, with
the same optimizer, learning rate and per-worker batch, for the same number of samples,
and is evaluated on the whole Fashion-MNIST test set at the same sample counts. Wall
times include start-up and evaluations (every strategy pays the same number of them;
`local` also evaluates each worker's own model). Writes strategies-n{N}.json (every
curve), strategies-n{N}.md (the table) and strategies-n{N}.png (test accuracy against
wall time) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import run_trainer  # noqa: E402
from libe_cnn.config import STRATEGIES  # noqa: E402
from mnist.data import locate, read_idx  # noqa: E402
from libe_cnn.plan import steps_per_epoch  # noqa: E402

def curve(records: list[dict]) -> list[dict]:
    return [{"samples": r["samples"], "wall_s": r["wall_s"], "test_accuracy": r["test_accuracy"]}
            for r in records if r.get("event") == "eval"]


def row(strategy: str, summary: dict) -> str:
    notes = []
    if "best_worker_accuracy" in summary:
        notes.append(f"best single worker {summary['best_worker_accuracy']:.2%}")
    if "dropped" in summary:
        notes.append(f"mean staleness {summary['mean_staleness']:.2f}, {summary['dropped']} dropped")
    cells = [strategy, f"{summary['test_accuracy']:.2%}", f"{summary['wall_s']:.1f}",
             f"{summary['samples_per_s']:.0f}", f"{summary['store_bytes_per_sample'] / 1e3:.1f}", "; ".join(notes)]
    return "| " + " | ".join(cells) + " |"


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, result in results.items():
        points = result["curve"]
        ax.plot([p["wall_s"] for p in points], [100 * p["test_accuracy"] for p in points], marker="o",
                markersize=3, label=strategy)
    ax.set_xlabel("wall time (s, including start-up and evaluation)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4, help="workers (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1, help="sample budget in epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="per worker (default: %(default)s)")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first K samples only")
    p.add_argument("--evals", type=int, default=8, help="evaluations per epoch (default: %(default)s)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true",
                   help="redraw the table and plot from the saved results, without training")
    args = p.parse_args()
    if args.report_only:
        data = Path(args.out) / f"strategies-n{args.n}.json"
        if not data.exists():
            p.error(f"no saved results at {data}: run without --report-only first")
        print(report(data))
        return

    files = locate("fashion-mnist", None)
    n_train = args.limit_train or len(read_idx(files.paths["train_labels"]))
    per_epoch = steps_per_epoch(n_train, args.n, args.batch_size)
    eval_every = max(1, per_epoch // args.evals)
    options = ["-n", str(args.n), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--eval-every", str(eval_every), *(["--limit-train", str(n_train)] if args.limit_train else [])]

    results = {}
    for strategy in args.strategies:
        print(f"{strategy} ...", file=sys.stderr)
        summary, records = run_trainer(*options, "--strategy", strategy)
        results[strategy] = {"summary": summary, "curve": curve(records)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"strategies-n{args.n}.json"
    data.write_text(json.dumps({"args": vars(args), "eval_every": eval_every, "results": results}, indent=2) + "\n")
    print(report(data))


def report(data: Path) -> str:
    """Write the table (.md) and the plot (.png) beside the results (.json); returns the table."""
    saved = json.loads(data.read_text())
    args, results = saved["args"], saved["results"]
    budget = next(iter(results.values()))["summary"]["samples"]
    title = (f"Fashion-MNIST, N={args['n']} workers x {args['batch_size']}, adam 1e-3, "
             f"{budget} samples ({args['epochs']} epoch{'s' if args['epochs'] > 1 else ''})")
    lines = [title + "; the other options at their defaults (sync-period 4, mix-lambda 0.5, "
             "elastic-alpha 0.9/N for easgd and 0.25 for elastic-gossip, random gossip pairs that always "
             "exchange, no staleness limit). Wall time and samples/s include start-up and the evaluations.", "",
             "| strategy | final test accuracy | wall s | samples/s | store kB per sample | notes |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [row(strategy, r["summary"]) for strategy, r in results.items()]
    text = "\n".join(lines) + "\n"
    data.with_suffix(".md").write_text(text)
    plot(results, data.with_suffix(".png"), title)
    return text


if __name__ == "__main__":
    main()

"""DiLoCo's outer optimizer on this model: the defaults of --outer-lr and --outer-momentum.

    python -m benchmarks.diloco            (about 10 minutes here)

N=2 workers x 64 on Fashion-MNIST for one epoch, inner Adam 1e-3, every run from the same
initial weights on the same shards: sync as the reference, then a grid of outer learning
rates and momenta (outer lr 1 with no momentum is param-avg) at each H = --sync-period of
--periods. Writes diloco-n2.json and diloco-n2.md into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.baselines import ROOT, run_trainer

GRID = [(1.0, 0.0), (0.7, 0.9), (0.5, 0.9), (0.3, 0.9), (1.0, 0.5), (0.7, 0.5)]


def trial(options: list[str], *extra: str) -> dict:
    summary, _ = run_trainer(*options, *extra)
    return {key: summary[key] for key in ("test_accuracy", "train_loss", "wall_s", "store_bytes_per_sample")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--periods", type=int, nargs="+", default=[8, 32])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    options = ["-n", "2", "--batch-size", "64", "--epochs", str(args.epochs)]
    runs = [{"strategy": "sync", **trial(options)}]
    for h in args.periods:
        for lr, momentum in GRID:
            runs.append({"strategy": "diloco", "H": h, "outer_lr": lr, "outer_momentum": momentum,
                         **trial(options, "--strategy", "diloco", "--sync-period", str(h), "--outer-lr", str(lr),
                                 "--outer-momentum", str(momentum))})
            print(runs[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diloco-n2.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")
    lines = [f"Fashion-MNIST, N=2 x 64, inner adam 1e-3, {args.epochs} epoch(s); outer lr 1 and momentum 0 "
             "is param-avg.", "",
             "| strategy | H | outer lr | outer momentum | test accuracy | train loss | store kB per sample |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        lines.append(f"| {r['strategy']} | {r.get('H', '')} | {r.get('outer_lr', '')} | {r.get('outer_momentum', '')} "
                     f"| {r['test_accuracy']:.2%} | {r['train_loss']:.3f} | {r['store_bytes_per_sample'] / 1e3:.1f} |")
    (out / "diloco-n2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

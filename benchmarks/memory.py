"""Manager memory over a long run: the history must not keep gradients alive.

    python benchmarks/memory.py -n 2 --steps 500

Reads the manager's resident memory that the generator records at every step and reports
its growth from step 10 (start-up done) to the last step. Target: under 50 MB.
Writes memory-n{N}-s{STEPS}.json and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import run_trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    _, records = run_trainer("-n", str(args.n), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps))
    steps = [r for r in records if "event" not in r]
    start, end = steps[9], steps[-1]
    growth = end["manager_rss_mb"] - start["manager_rss_mb"]
    result = {"args": vars(args), "manager_rss_mb_at_step_10": start["manager_rss_mb"],
              "manager_rss_mb_at_end": end["manager_rss_mb"], "growth_mb": growth,
              "peak_sim_rss_mb": max(s["sim_rss_mb"] for s in steps),
              "rss_by_step": [(s["step"], s["manager_rss_mb"]) for s in steps[::25]]}
    text = (f"Manager RSS over {len(steps)} steps (N={args.n}, {args.batch_size} per worker): "
            f"{start['manager_rss_mb']:.0f} MB at step 10, {end['manager_rss_mb']:.0f} MB at step {end['step']}: "
            f"growth **{growth:+.1f} MB** (target < 50 MB).\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory-n{args.n}-s{args.steps}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"memory-n{args.n}-s{args.steps}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

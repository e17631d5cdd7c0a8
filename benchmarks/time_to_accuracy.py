"""Wall time until the parent model reaches a test accuracy: the trainer against torch DDP.

    python benchmarks/time_to_accuracy.py -n 2 --batch-size 64 --target 0.90 --seeds 1 2 3

Both train the same CNN with the same global batch, optimizer and learning rate, and both
evaluate on the whole Fashion-MNIST test set at the same steps (four times per epoch).
Clocks start after the first step (start-up excluded) and stop during evaluations. Each seed
(initial weights, batch order, dropout) runs DDP and then the trainer, one after the other.
Writes time-to-accuracy-n{N}-b{B}.json and .md into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import Workload, ddp, run_trainer, trainer_options  # noqa: E402
from libe_cnn.runtime import available_cores, threads_per_worker  # noqa: E402
from mnist.data import load_split, locate, read_idx  # noqa: E402
from libe_cnn.plan import steps_per_epoch  # noqa: E402


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((point for point in curve if point["test_accuracy"] >= target), None)


def ours_curve(w: Workload, steps: int, eval_every: int, wire_dtype: str) -> list[dict]:
    _, records = run_trainer(*trainer_options(w), "--epochs", str(-(-steps // steps_per_epoch(
        w.n_train, w.n_workers, w.batch_size))), "--max-steps", str(steps), "--eval-every", str(eval_every),
        "--wire-dtype", wire_dtype)
    start = next(r["wall_s"] for r in records if r.get("step") == 1 and "event" not in r)
    curve, eval_total = [], 0.0
    for r in records:
        if r.get("event") == "eval":
            # The evaluation ran after this step was published; its own time is excluded.
            curve.append({"step": r["step"], "wall_s": r["wall_s"] - r["eval_s"] - eval_total - start,
                          "test_accuracy": r["test_accuracy"]})
            eval_total += r["eval_s"]
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per worker (default: %(default)s)")
    p.add_argument("--target", type=float, default=0.90)
    p.add_argument("--max-steps", type=int, default=None,
                   help="train at most this many steps (default: 2.75 epochs; 90%% comes at about 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="one pair of runs each (default: 1)")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    files = locate("fashion-mnist", None)
    n_train = len(read_idx(files.paths["train_labels"]))
    w = Workload(files, n_train=n_train, n_workers=args.n, batch_size=args.batch_size)
    per_epoch = steps_per_epoch(n_train, args.n, args.batch_size)
    eval_every = per_epoch // 4 if per_epoch % 4 == 0 else per_epoch
    total = args.max_steps or (per_epoch * 11) // 4
    test_set = load_split(files, train=False)

    results, lines = [], [
        f"Time to {args.target:.0%} Fashion-MNIST test accuracy, N={args.n}, {args.batch_size} per worker "
        f"(global {args.n * args.batch_size}), adam 1e-3, evaluated every {eval_every} steps; "
        "wall s excluding start-up and evaluation:", "",
        "| seed | ours: step | ours: s | DDP: step | DDP: s | ours / DDP |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for seed in args.seeds:
        ws = dataclasses.replace(w, seed=seed)
        print(f"seed {seed}: torch DDP ...", file=sys.stderr)
        ddp_curve = ddp(ws, threads=threads_per_worker(available_cores(), args.n), steps=total - 1, warmup=1,
                        eval_every=eval_every, test_set=test_set)["curve"]
        print(f"seed {seed}: run_libe_cnn.py ...", file=sys.stderr)
        our_curve = ours_curve(ws, total, eval_every, args.wire_dtype)
        ours_hit, ddp_hit = first_reaching(our_curve, args.target), first_reaching(ddp_curve, args.target)
        ratio = ours_hit["wall_s"] / ddp_hit["wall_s"] if ours_hit and ddp_hit else None
        results.append({"seed": seed, "ours": our_curve, "ddp": ddp_curve, "ratio": ratio,
                        "ours_time_s": ours_hit and ours_hit["wall_s"], "ddp_time_s": ddp_hit and ddp_hit["wall_s"]})

        def cells(hit):
            return [str(hit["step"]), f"{hit['wall_s']:.1f}"] if hit else [f"not in {total}", "-"]
        lines.append("| " + " | ".join([str(seed), *cells(ours_hit), *cells(ddp_hit),
                                         f"{ratio:.2f}" if ratio else "-"]) + " |")
    ratios = [r["ratio"] for r in results if r["ratio"] is not None]
    if ratios:
        lines += ["", f"ours / DDP time, mean over {len(ratios)} seed(s) = **{sum(ratios) / len(ratios):.2f}**"]
    result = {"args": vars(args), "eval_every": eval_every, "seeds": results,
              "mean_ratio": sum(ratios) / len(ratios) if ratios else None}
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"time-to-accuracy-n{args.n}-b{args.batch_size}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

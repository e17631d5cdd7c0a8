"""Throughput of the trainer against the compute limit and torch DDP, measured in one run.

    python benchmarks/throughput.py -n 2 --batch-size 1000 --steps 20

Every contender trains the same CNN on the same Fashion-MNIST shards and batches with the
same optimizer and the same thread budget (the machine's cores, split evenly):

- the compute limit: N x one single-threaded process, and one process using all cores
  on the union batch;
- torch DDP over gloo: N processes with cores/N threads each;
- this tool: run_libe_cnn.py -n N.

Writes throughput-n{N}-b{B}.json and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import Workload, ddp, run_trainer, single_process, trainer_options  # noqa: E402
from gen_funcs.stats import BREAKDOWN  # noqa: E402
from libe_cnn.runtime import available_cores, threads_per_worker  # noqa: E402
from mnist.data import locate, read_idx  # noqa: E402


def ours(w: Workload, steps: int, warmup: int, wire_dtype: str) -> dict:
    """Run the trainer and read its steady throughput (after `warmup` steps, evaluation excluded)."""
    # Evaluations are not measured: a short test set keeps the final one from dominating a short run.
    summary, records = run_trainer(*trainer_options(w), "--max-steps", str(warmup + steps),
                                   "--wire-dtype", wire_dtype, "--limit-test", "1000")
    steps_ = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    first, last = steps_[warmup - 1], steps_[-1]
    eval_s = sum(e["eval_s"] for e in evals if first["step"] < e["step"] < last["step"])
    measured = steps_[warmup:]
    return {
        "samples_per_s": (last["samples"] - first["samples"]) / (last["wall_s"] - first["wall_s"] - eval_s),
        "breakdown_ms": {k: 1000 * sum(r[k] for r in measured) / len(measured) for k in BREAKDOWN},
        "store_bytes_per_step": summary["store_bytes_per_step"],
        "peak_manager_rss_mb": summary["peak_manager_rss_mb"],
        "peak_sim_rss_mb": summary["peak_sim_rss_mb"],
        "test_accuracy": summary["test_accuracy"],
    }


def markdown(result: dict) -> str:
    a = result["args"]
    rows = result["rates"]
    lines = [f"N={a['n']}, {a['batch_size']} samples per worker per step, {a['steps']} measured steps, "
             f"{result['cores']} cores, wire {a['wire_dtype']}", "",
             "| contender | samples/s |", "| --- | ---: |"]
    lines += [f"| {name} | {rate:.0f} |" for name, rate in rows.items()]
    r = result["ratios"]
    lines += ["", f"ours / DDP = **{r['ours_over_ddp']:.2f}**, ours / compute limit = **{r['ours_over_limit']:.2f}**", ""]
    o = result["ours"]
    step_ms = 1000 * a["batch_size"] * a["n"] / o["samples_per_s"]
    comm_ms = sum(o["breakdown_ms"][k] for k in ("fetch_s", "update_s", "publish_s"))
    lines += [f"Per step ({step_ms:.1f} ms), mean over the measured steps:", "",
              "| part | ms |", "| --- | ---: |"]
    lines += [f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in o["breakdown_ms"].items()]
    b = o["breakdown_ms"]
    lines += ["", f"The exchange beside the compute: the workers' store traffic took {b['sim_exchange_s']:.1f} ms "
              f"per step in their background threads, of which they waited {b['sim_load_s'] + b['sim_put_s']:.1f} ms "
              f"(load + put); the generator's work the workers waited for (exposed) {b['exposed_s']:.1f} ms."]
    lines += ["", f"Store traffic and generator work (fetch + update + publish): {comm_ms:.1f} ms "
              f"= {100 * comm_ms / step_ms:.1f}% of the step; "
              f"bytes through Redis per step: {o['store_bytes_per_step'] / 1e6:.1f} MB; "
              f"peak RSS: manager {o['peak_manager_rss_mb']:.0f} MB, simulator {o['peak_sim_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2, help="workers (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1000, help="samples per worker per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="measured steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (default: %(default)s)")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the JSON and Markdown")
    args = p.parse_args()

    files = locate("fashion-mnist", None)
    w = Workload(files, n_train=len(read_idx(files.paths["train_labels"])), n_workers=args.n,
                 batch_size=args.batch_size)
    cores = available_cores()
    per_worker = threads_per_worker(cores, args.n)
    rates = {}
    print("one process, 1 thread ...", file=sys.stderr)
    one_thread = single_process(w, threads=1, steps=args.steps, warmup=args.warmup, union=False)
    rates[f"compute limit: {args.n} x one process with 1 thread"] = args.n * one_thread
    print("one process, all cores, union batch ...", file=sys.stderr)
    rates[f"one process, {cores} threads, batch {args.n * args.batch_size}"] = single_process(
        w, threads=cores, steps=args.steps, warmup=args.warmup, union=True)
    print("torch DDP ...", file=sys.stderr)
    rates[f"torch DDP (gloo), {args.n} x {per_worker} threads"] = ddp(
        w, threads=per_worker, steps=args.steps, warmup=args.warmup)["samples_per_s"]
    print("run_libe_cnn.py ...", file=sys.stderr)
    mine = ours(w, args.steps, args.warmup, args.wire_dtype)
    rates[f"ours: run_libe_cnn.py -n {args.n}"] = mine["samples_per_s"]

    names = list(rates)
    limit = max(rates[names[0]], rates[names[1]])
    result = {
        "args": vars(args), "cores": cores, "rates": rates, "ours": mine,
        "ratios": {"ours_over_ddp": mine["samples_per_s"] / rates[names[2]],
                   "ours_over_limit": mine["samples_per_s"] / limit},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"throughput-n{args.n}-b{args.batch_size}" + ("" if args.wire_dtype == "float32" else f"-{args.wire_dtype}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Throughput of the trainer against the compute limit and torch DDP, measured in one run.

    .venv/bin/python benchmarks/throughput.py -n 2 --batch-size 1000 --steps 20

Every contender trains the same CNN on the same Fashion-MNIST shards and batches with the
same optimizer and the same thread budget (the machine's cores, split evenly):

- the compute limit: N x one single-threaded process, and one process using all cores
  on the union batch;
- torch DDP over gloo: N processes with cores/N threads each, run before and after the trainer
  so that a machine that speeds up or slows down during the run shows;
- this tool: run_libe_cnn.py -n N, once per --transports (shared memory, Redis).

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


def ours(w: Workload, steps: int, warmup: int, wire_dtype: str, transport: str) -> dict:
    """Run the trainer and read its steady throughput (after `warmup` steps, evaluation excluded)."""
    # Evaluations are not measured: a short test set keeps the final one from dominating a short run.
    summary, records = run_trainer(*trainer_options(w), "--max-steps", str(warmup + steps),
                                   "--wire-dtype", wire_dtype, "--limit-test", "1000", "--transport", transport)
    assert transport == "auto" or summary["transport"] == transport, summary["transport"]
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
    lines = [f"N={a['n']}, {a['batch_size']} samples per worker per step, {a['steps']} measured steps, "
             f"{result['cores']} cores, wire {a['wire_dtype']}", "",
             "| contender | samples/s |", "| --- | ---: |"]
    lines += [f"| {name} | {rate:.0f} |" for name, rate in result["rates"].items()]
    lines += [""] + [f"ours over {t} / DDP (the mean of before and after) = **{r:.2f}**"
                     for t, r in result["ratios"].items()]
    for transport, o in result["ours"].items():
        step_ms = 1000 * a["batch_size"] * a["n"] / o["samples_per_s"]
        b = o["breakdown_ms"]
        comm_ms = sum(b[k] for k in ("fetch_s", "update_s", "publish_s"))
        lines += ["", f"**{transport}**: per step ({step_ms:.1f} ms), mean over the measured steps:", "",
                  "| part | ms |", "| --- | ---: |"]
        lines += [f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in b.items()]
        lines += ["", f"The exchange beside the compute: the workers' store traffic took {b['sim_exchange_s']:.1f} ms "
                  f"per step in their background threads, of which they waited {b['sim_load_s'] + b['sim_put_s']:.1f} "
                  f"ms (load + put); the generator's work the workers waited for (exposed) {b['exposed_s']:.1f} ms. "
                  f"Store traffic and generator work (fetch + update + publish): {comm_ms:.1f} ms "
                  f"= {100 * comm_ms / step_ms:.1f}% of the step; "
                  f"bytes through Redis per step: {o['store_bytes_per_step'] / 1e6:.2f} MB; "
                  f"peak RSS: manager {o['peak_manager_rss_mb']:.0f} MB, simulator {o['peak_sim_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2, help="workers (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1000, help="samples per worker per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="measured steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (default: %(default)s)")
    p.add_argument("--wire-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--transports", nargs="+", default=["shm", "redis"], choices=("shm", "redis"),
                   help="the trainer's --transport, one run each (default: %(default)s)")
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
    ddp_rates = []

    def run_ddp(when: str) -> None:
        print(f"torch DDP ({when}) ...", file=sys.stderr)
        ddp_rates.append(ddp(w, threads=per_worker, steps=args.steps, warmup=args.warmup)["samples_per_s"])
        rates[f"torch DDP (gloo), {args.n} x {per_worker} threads, {when}"] = ddp_rates[-1]

    run_ddp("before")
    mine = {}
    for transport in args.transports:
        print(f"run_libe_cnn.py --transport {transport} ...", file=sys.stderr)
        mine[transport] = ours(w, args.steps, args.warmup, args.wire_dtype, transport)
        rates[f"ours: run_libe_cnn.py -n {args.n} --transport {transport}"] = mine[transport]["samples_per_s"]
    run_ddp("after")
    ddp_mean = sum(ddp_rates) / len(ddp_rates)
    result = {
        "args": vars(args), "cores": cores, "rates": rates, "ours": mine,
        "ratios": {t: o["samples_per_s"] / ddp_mean for t, o in mine.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"throughput-n{args.n}-b{args.batch_size}" + ("" if args.wire_dtype == "float32" else f"-{args.wire_dtype}")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Pipeline against data parallelism, and against torch.distributed.pipelining, in one run.

    .venv/bin/python -m benchmarks.parallelism [--model resnet18-narrow] [--quick]

Every configuration trains the same model on the same Fashion-MNIST samples with the same
global batch, optimizer (Adam 1e-3), seed and number of steps, one configuration at a time:

- data parallelism, N=1 (batch 64) and N=2 (32 per worker);
- `run_libe_cnn.py -n 2 --parallelism pipeline --stages 2 --split time`, batch 64, for each
  number of micro-batches M and both schedules;
- right after each, torch.distributed.pipelining (benchmarks/torch_pipeline.py) on the split
  our run resolved (summary.json `split`), same K, M, schedule, batch and steps.

Writes parallelism.json and .md, and parallelism.png (above: samples/s against M, with the
ideal: compute limit x (1 - (K-1)/(M+K-1)); below: each stage's step: compute, waiting for
its neighbour, activation transfer, the rest) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import run_trainer  # noqa: E402
from libe_cnn.pipeline.schedule import bubble_fraction  # noqa: E402
from libe_cnn.pipeline.schedule import peak_stash, schedule as schedule_of  # noqa: E402
from libe_cnn.pipeline.split import INPUT_SHAPES, balance, parameter_counts, stage_bounds  # noqa: E402
from mnist.data import load_split, locate  # noqa: E402
from mnist.model import build_model, evaluate  # noqa: E402

K = 2
SCHEDULES = ("gpipe", "1f1b")
WARMUP = 2  # the trainer's summary leaves out its first 2 steps (gen_funcs/stats.py)


def ours(a, n: int, batch: int, extra: list[str]) -> dict:
    """One run of the trainer; what the tables need from its summary and per-step records."""
    summary, records = run_trainer("--dataset", a.dataset, "--model", a.model, "-n", str(n), "--batch-size",
                                   str(batch), "--seed", str(a.seed), "--max-steps", str(WARMUP + a.steps),
                                   "--limit-train", str(a.limit_train), "--limit-test", str(a.limit_test), *extra)
    b = summary["breakdown_s"]
    row = {"samples_per_s": summary["steady_samples_per_s"], "step_s": summary["steady_step_s"],
           "store_bytes_per_sample": summary["store_bytes_per_sample"],
           "store_bytes_per_step": summary["store_bytes_per_step"], "peak_sim_rss_mb": summary["peak_sim_rss_mb"],
           "test_accuracy": summary["test_accuracy"], "samples": summary["samples"],
           "breakdown_s": {k: v for k, v in b.items()}}
    if summary.get("parallelism") == "pipeline":
        steps = [r for r in records if "event" not in r][WARMUP:]
        row.update(split=summary["split"], bubble=b["stage_bubble"], bubble_theory=summary["bubble_theory"],
                   stage_compute_s=b["stage_compute_s"], stage_wait_s=b["stage_peer_wait_s"],
                   stage_transfer_s=[sum(t) / len(steps) for t in zip(*map(transfers, steps))])
        c = row["stage_compute_s"]
        row["imbalance"] = max(c) / (sum(c) / len(c))
    return row


def transfers(r: dict) -> list[float]:
    """A step's per-stage activation transfer (busy in the store), from bubble = w / (c + w + t);
    a stage that did not wait gets its share of the mean over the workers (sim_exchange_s)."""
    c, w, bub = r["stage_compute_s"], r["stage_peer_wait_s"], r["stage_bubble"]
    t = [wi / bi - ci - wi if bi > 0 else None for ci, wi, bi in zip(c, w, bub)]
    unknown = [i for i, v in enumerate(t) if v is None]
    rest = len(t) * r["sim_exchange_s"] - sum(v for v in t if v is not None)
    return [max(0.0, rest / len(unknown)) if v is None else v for v in t]


def torch_pipe(a, split: str, m: int, schedule: str, data, test) -> dict:
    """torch.distributed.pipelining on the same split; its test accuracy from its final parameters."""
    try:
        from benchmarks import torch_pipeline
    except Exception as e:  # noqa: BLE001 - the column says why it is missing
        return {"missing": f"benchmarks/torch_pipeline.py not importable: {e!r}"}
    try:
        r = torch_pipeline.run(a.dataset, a.model, [int(s) for s in split.split(",")], m, schedule, 64, a.steps,
                               seed=a.seed, warmup=WARMUP, data=data, return_params=True)
    except Exception as e:  # noqa: BLE001
        return {"missing": f"{type(e).__name__}: {e}"[:300]}
    out = {k: r[k] for k in ("samples_per_s", "step_s", "bubble", "stage_busy_s", "peak_rss_mb", "losses")}
    try:
        model = build_model(a.seed, dataset=a.dataset, model=a.model)
        seq = __import__("torch").nn.Sequential(*model.layers())
        state = {k: __import__("torch").as_tensor(v) for stage in r["params"] for k, v in stage.items()}
        missing = seq.load_state_dict(state, strict=False).missing_keys
        out["test_accuracy"] = None if missing else evaluate(model, *test)[1]
    except Exception:  # noqa: BLE001
        out["test_accuracy"], out["eval_error"] = None, traceback.format_exc(limit=1)[-300:]
    return out


def memory(a, split: str) -> dict:
    """Bytes of float32 state: each stage worker's parameters + gradient against a whole model's
    parameters + gradient + Adam's two moments (in this product the generator holds the optimizer)."""
    layers = build_model(a.seed, dataset=a.dataset, model=a.model).layers()
    counts = parameter_counts(layers)
    bounds = stage_bounds(split, len(layers))
    per_stage = [sum(counts[bounds[s]:bounds[s + 1]]) for s in range(len(bounds) - 1)]
    whole = 4 * 4 * sum(counts)
    return {"stage_parameters": per_stage, "whole_parameters": sum(counts), "whole_state_bytes": whole,
            "stage_worker_bytes": [2 * 4 * p for p in per_stage],
            "stage_worker_over_whole": [2 * 4 * p / whole for p in per_stage],
            "stage_with_adam_over_whole": [p / sum(counts) for p in per_stage]}


def stashed_bytes(a, split: str, m: int, schedule: str) -> list[int]:
    """Per stage, the bytes autograd keeps for the micro-batches a stage holds at its busiest:
    the tensors one micro-batch's forward saves for backward, times the schedule's peak stash."""
    import torch

    layers = build_model(a.seed, dataset=a.dataset, model=a.model).layers()
    bounds = stage_bounds(split, len(layers))
    x = torch.randn(64 // m, *INPUT_SHAPES[a.dataset])
    per_stage = []
    for s in range(len(bounds) - 1):
        saved = []
        x = x.detach().requires_grad_(s > 0)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = torch.nn.Sequential(*layers[bounds[s]:bounds[s + 1]])(x)
        per_stage.append(sum(saved) * peak_stash(schedule_of(s, len(bounds) - 1, m, schedule)))
        x = out
    return per_stage


def fmt_list(xs, f="{:.2f}") -> str:
    return " / ".join(f.format(x) for x in xs)


def markdown(res: dict) -> str:
    a, rows = res["args"], res["rows"]
    base = rows[0]["samples_per_s"]
    lines = [f"{a['model']} on {a['dataset']}, global batch 64, {a['steps']} measured steps after {WARMUP} "
             f"(every configuration sees the same {64 * (a['steps'] + WARMUP)} samples), seed {a['seed']}, "
             f"{res['cores']} cores; pipelines K={K} on -n 2 (one replica), --split {a.get('split', 'time')}.", "",
             "| configuration | split | samples/s | vs data N=1 | bubble per stage (measured) | theory | "
             "imbalance | store KB/sample | peak RSS MB/worker | test acc | torch pipelining samples/s | "
             "ours / torch | torch bubble per stage | torch test acc |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        pipe = r["kind"] == "pipeline"
        t = r.get("torch") or {}
        acc = f"{100 * t['test_accuracy']:.1f}%" if t.get("test_accuracy") is not None else "-"
        tcol = (f"{t['samples_per_s']:.0f} | **{r['ours_over_torch']:.2f}** | {fmt_list(t['bubble'])} | {acc}"
                if "samples_per_s" in t else (f"missing: {t['missing']} | - | - | -" if t else "- | - | - | -"))
        lines.append(
            f"| {r['name']} | {r.get('split', '-')} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / base:.2f} | "
            + (f"{fmt_list(r['bubble'])} | {r['bubble_theory']:.2f} | {r['imbalance']:.2f}" if pipe else "- | - | -")
            + f" | {r['store_bytes_per_sample'] / 1e3:.0f} | {r['peak_sim_rss_mb']:.0f} | "
            f"{100 * r['test_accuracy']:.1f}% | {tcol} |")
    lines += ["", "Per stage, ms per step (compute / waiting for the neighbour / activation transfer through "
              "the store / the rest: parameter load, gradient put, waiting for the generator):", "",
              "| configuration | stage 0 | stage 1 | step |", "| --- | --- | --- | ---: |"]
    for r in rows:
        if r["kind"] == "pipeline":
            cells = [fmt_list([1e3 * r["stage_compute_s"][s], 1e3 * r["stage_wait_s"][s],
                               1e3 * r["stage_transfer_s"][s], 1e3 * rest], "{:.0f}")
                     for s, rest in enumerate(rest_s(r))]
            lines.append(f"| {r['name']} | {' | '.join(cells)} | {1e3 * r['step_s']:.0f} |")
    lines += ["", "State per worker (float32 bytes), from the split:", "",
              "| split | parameters per stage | stage worker: params + grad | / whole model params + grad + "
              "Adam m, v | like for like (stage with Adam / whole with Adam) |", "| --- | --- | --- | --- | --- |"]
    for split, m in res["memory"].items():
        lines.append(f"| {split} | {fmt_list(m['stage_parameters'], '{:,}')} (of {m['whole_parameters']:,}) | "
                     f"{fmt_list([b / 1e6 for b in m['stage_worker_bytes']], '{:.2f}')} MB | "
                     f"{fmt_list(m['stage_worker_over_whole'])} (whole: {m['whole_state_bytes'] / 1e6:.2f} MB) | "
                     f"{fmt_list(m['stage_with_adam_over_whole'])} |")
    lines += ["", "Activations autograd keeps per stage worker at its busiest (the micro-batches its schedule "
              "holds at once x what one micro-batch's forward saves for backward), MB:", "",
              "| configuration | split | stage 0 / stage 1 |", "| --- | --- | --- |"]
    for r in rows:
        if r["kind"] == "pipeline" and "stashed_bytes" in r:
            lines.append(f"| {r['name']} | {r['split']} | {fmt_list([b / 1e6 for b in r['stashed_bytes']], '{:.1f}')} |")
    lines += ["", f"Compute limit of the pipeline (64 / mean stage compute at the smallest M): "
              f"{compute_limit(res):.0f} samples/s; ideal = that x (1 - (K-1)/(M+K-1))."]
    lines += ["", "The generator holds the whole model's parameters and Adam's moments in this product (it steps "
              "every stage's bucket), so a stage worker keeps only its stage's parameters and gradient."]
    lines += ["", "ours / torch pipelining per (M, schedule): " + ", ".join(
        f"M={r['m']} {r['schedule']}: " + (f"{r['ours_over_torch']:.2f}" if "ours_over_torch" in r
                                           else "missing")
        for r in rows if r["kind"] == "pipeline")]
    return "\n".join(lines) + "\n"


def rest_s(r: dict) -> list[float]:
    return [max(0.0, r["step_s"] - c - w - t)
            for c, w, t in zip(r["stage_compute_s"], r["stage_wait_s"], r["stage_transfer_s"])]


def compute_limit(res: dict) -> float:
    """The pipeline without bubble or imbalance: the batch over the mean stage compute per step at
    the smallest M (whole batches per layer; data N=1 is no measure here: its one worker has
    all cores' threads, which on a loaded machine ran slower than one)."""
    r = min((r for r in res["rows"] if r["kind"] == "pipeline"), key=lambda r: r["m"])
    return 64 / (sum(r["stage_compute_s"]) / K)


def plot(res: dict, out: Path, stem: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no interactive backend

    rows = res["rows"]
    pipes = [r for r in rows if r["kind"] == "pipeline"]
    ms = sorted({r["m"] for r in pipes})
    # One figure beside its data (parallelism.json): throughput above, each stage's step below.
    fig = Figure(figsize=(11, 9))
    FigureCanvasAgg(fig)
    panels = fig.subplot_mosaic([["throughput", "throughput"], list(SCHEDULES)])
    ax = panels["throughput"]
    limit = compute_limit(res)
    dense = [1 + i / 10 for i in range(10 * (max(ms) - 1) + 1)]
    ax.plot(dense, [limit * (1 - bubble_fraction(K, m)) for m in dense], color="k", ls=":", lw=1,
            label=f"ideal: {K} x one worker's compute x (1 - bubble)")
    for s, color in zip(SCHEDULES, ("tab:blue", "tab:green")):
        mine = [r for r in pipes if r["schedule"] == s]
        ax.plot([r["m"] for r in mine], [r["samples_per_s"] for r in mine], "o-", color=color, label=f"ours, {s}")
        ax.plot([r["m"] for r in mine], [64 / max(r["stage_compute_s"]) * (1 - r["bubble_theory"]) for r in mine],
                "x", color=color, label=f"64 / slowest stage's compute x (1 - bubble), {s}")
        tp = [r for r in mine if "samples_per_s" in (r.get("torch") or {})]
        if tp:
            ax.plot([r["m"] for r in tp], [r["torch"]["samples_per_s"] for r in tp], "s--", color=color,
                    alpha=0.6, label=f"torch pipelining, {s}")
    for r, ls in zip(rows[:2], ("-.", "--")):
        ax.axhline(r["samples_per_s"], color="tab:red", ls=ls, lw=1, label=r["name"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_xlabel("micro-batches M")
    ax.set_ylabel("samples/s (steady)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{res['args']['model']}, K={K}, global batch 64", fontsize=10)
    ax.legend(fontsize=7)
    axes = [panels[s] for s in SCHEDULES]
    axes[1].sharey(axes[0])
    parts = (("compute", "tab:blue"), ("wait", "tab:orange"), ("transfer", "tab:purple"), ("rest", "tab:gray"))
    for ax, s in zip(axes, SCHEDULES):
        mine = [r for r in pipes if r["schedule"] == s]
        labels, x = [], 0
        for r in mine:
            values = (r["stage_compute_s"], r["stage_wait_s"], r["stage_transfer_s"], rest_s(r))
            for st in range(K):
                bottom = 0.0
                for (name, color), v in zip(parts, values):
                    ax.bar(x, 1e3 * v[st], bottom=bottom, color=color, label=name if x == 0 else None)
                    bottom += 1e3 * v[st]
                labels.append(f"M={r['m']}\ns{st}")
                x += 1
            x += 0.5
        ax.set_xticks([i + 0.5 * (i // K) for i in range(len(labels))], labels, fontsize=7)
        ax.set_title(f"ours, {s}: ms per step per stage", fontsize=10)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ms per step")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18-narrow", choices=("cnn", "resnet18", "resnet18-narrow"))
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=30, help="measured steps per configuration (default: %(default)s)")
    p.add_argument("--limit-train", type=int, default=4096)
    p.add_argument("--limit-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--split", default="time", help="the pipelines' --split (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="M in 1 4, 8 steps: a smoke run")
    p.add_argument("--report-only", action="store_true", help="redraw the tables and plots from the saved JSON")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / ("parallelism-quick.json" if a.quick else "parallelism.json")
    if a.report_only:
        res = json.loads(data_path.read_text())
        for row in res["rows"]:  # what the split alone decides is computed again
            if row["kind"] == "pipeline":
                res["memory"][row["split"]] = memory(a, row["split"])
                row["stashed_bytes"] = stashed_bytes(a, row["split"], row["m"], row["schedule"])
    else:
        if a.quick:
            a.microbatches, a.steps = [1, 4], 8
        from libe_cnn.runtime import available_cores

        files = locate(a.dataset, None)
        data = load_split(files, True, a.limit_train)
        test = load_split(files, False, a.limit_test)
        import subprocess

        tp = subprocess.run(["git", "log", "-1", "--format=%h", "--", "benchmarks/torch_pipeline.py"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
        res = {"args": vars(a), "cores": available_cores(), "rows": [], "memory": {},
               "torch_pipeline_commit": tp or "uncommitted working copy"}
        for n in (1, 2):
            print(f"data parallelism N={n} ...", file=sys.stderr)
            row = ours(a, n, 64 // n, [])
            res["rows"].append({"name": f"data N={n}", "kind": "data", "n": n, **row})
        for m in a.microbatches:
            for s in SCHEDULES:
                print(f"pipeline K={K} M={m} {s} ...", file=sys.stderr)
                row = {"name": f"pipeline M={m} {s}", "kind": "pipeline", "m": m, "schedule": s,
                       **ours(a, 2, 64, ["--parallelism", "pipeline", "--stages", str(K), "--microbatches",
                                         str(m), "--schedule", s, "--split", a.split])}
                print(f"  ours {row['samples_per_s']:.0f} samples/s, split {row['split']}; torch ...", file=sys.stderr)
                row["torch"] = torch_pipe(a, row["split"], m, s, data, test)
                if "samples_per_s" in row["torch"]:
                    row["ours_over_torch"] = row["samples_per_s"] / row["torch"]["samples_per_s"]
                    print(f"  ours / torch = {row['ours_over_torch']:.2f}", file=sys.stderr)
                res["memory"].setdefault(row["split"], memory(a, row["split"]))
                row["stashed_bytes"] = stashed_bytes(a, row["split"], m, s)
                res["rows"].append(row)
                data_path.write_text(json.dumps(res, indent=2) + "\n")  # a partial run keeps what it measured
        data_path.write_text(json.dumps(res, indent=2) + "\n")
    # Where --split memory would cut, for the memory table: parameters balanced, not time.
    counts = parameter_counts(build_model(a.seed, dataset=a.dataset, model=a.model).layers())
    by_memory = ",".join(map(str, balance([float(c) for c in counts], K)))
    res["memory"][f"{by_memory} (--split memory)"] = memory(a, by_memory)
    text = markdown(res)
    data_path.with_suffix(".md").write_text(text)
    plot(res, out, data_path.stem)
    print(text)


if __name__ == "__main__":
    main()

"""How the hub's cost grows with N, for each reduce topology of sync, measured in one run.

    python benchmarks/scaling.py --sizes 1 2 4 8 16 --steps 30

At 16 samples per worker the compute is small, so the exchange shows. For every N and
topology (star: the generator reduces all N gradients; ring: the workers reduce a chunk each
first), on one Redis server and on N/2 servers (one per two workers, as two workers per node
would have), it reports from each run's summary.json:

- the generator's serial time per step: fetch_s + update_s + publish_s of breakdown_s, and its
  CPU time per step (gen_cpu_s: its own work, whatever share of the cores the N workers leave it);
- the bytes through the busiest Redis server per step;
- steady samples/s.

Writes scaling.json, scaling.md and scaling.png into --out (--replot: only the figure, from
the scaling.json already there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import run_trainer  # noqa: E402

SERIAL = ("fetch_s", "update_s", "publish_s")


def measure(n: int, topology: str, servers: int, batch_size: int, steps: int) -> dict:
    summary, _ = run_trainer("-n", str(n), "--batch-size", str(batch_size), "--max-steps", str(steps),
                             "--reduce-topology", topology, "--redis-servers", str(servers), "--limit-test", "500")
    parts = summary["breakdown_s"]
    return {
        "n": n, "topology": topology, "servers": servers,
        "generator_serial_ms": 1000 * sum(parts[k] for k in SERIAL),
        "parts_ms": {k: 1000 * parts[k] for k in (*SERIAL, "gen_wait_s", "exposed_s", "sim_compute_s")},
        "generator_cpu_ms": 1000 * parts["gen_cpu_s"],
        "busiest_server_mb_per_step": summary["busiest_server_bytes_per_step"] / 1e6,
        "store_mb_per_step": summary["store_bytes_per_step"] / 1e6,
        "samples_per_s": summary["steady_samples_per_s"],
    }


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"sync, {a['batch_size']} samples per worker per step, {a['steps']} steps (the first 2 not measured)", "",
             "| N | topology | servers | generator serial ms/step (fetch + update + publish) | generator CPU ms/step "
             "| busiest server MB/step | all servers MB/step | samples/s |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["runs"]:
        p = r["parts_ms"]
        lines.append(f"| {r['n']} | {r['topology']} | {r['servers']} | {r['generator_serial_ms']:.1f} "
                     f"({p['fetch_s']:.1f} + {p['update_s']:.1f} + {p['publish_s']:.1f}) | {r['generator_cpu_ms']:.1f} "
                     f"| {r['busiest_server_mb_per_step']:.1f} | {r['store_mb_per_step']:.1f} | {r['samples_per_s']:.0f} |")
    lines += ["", *(f"- {line}" for line in result["targets"])]
    return "\n".join(lines) + "\n"


def targets(runs: list[dict]) -> list[str]:
    """The issue's two ratios, where the runs to compute them are there."""
    def find(n, topology, servers):
        return next((r for r in runs if (r["n"], r["topology"], r["servers"]) == (n, topology, servers)), None)

    out = []
    for topology in ("star", "ring"):
        one, eight = find(1, topology, 1), find(8, topology, 1)
        if one and eight:
            out.append(f"{topology}: generator serial time at N=8 / N=1 = "
                       f"{eight['generator_serial_ms']:.1f} / {one['generator_serial_ms']:.1f} = "
                       f"**{eight['generator_serial_ms'] / one['generator_serial_ms']:.2f}** (target at most 1.5)")
        four, sixteen = find(4, topology, 2), find(16, topology, 8)
        if four and sixteen:
            out.append(f"{topology}: busiest server bytes at N=16 on 8 servers / N=4 on 2 = "
                       f"{sixteen['busiest_server_mb_per_step']:.1f} / {four['busiest_server_mb_per_step']:.1f} MB = "
                       f"**{sixteen['busiest_server_mb_per_step'] / four['busiest_server_mb_per_step']:.2f}** "
                       "(target at most 1.25)")
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("generator_serial_ms", "generator serial time per step (ms)"),
              ("generator_cpu_ms", "generator CPU time per step (ms)"),
              ("busiest_server_mb_per_step", "busiest Redis server, MB per step"))
    for topology, style in (("star", "o"), ("ring", "s")):
        for spread in (False, True):
            mine = sorted((r for r in runs if r["topology"] == topology
                           and r["servers"] == (max(1, r["n"] // 2) if spread else 1)), key=lambda r: r["n"])
            line = style + ("--" if spread else "-")
            label = f"{topology}, {'a server per 2 workers' if spread else 'one server'}"
            for ax, (field, _) in zip(axes, panels):
                ax.plot([r["n"] for r in mine], [r[field] for r in mine], line, label=label)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers N")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left = axes[0]
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="values of N (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per worker per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="steps per run (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the results")
    p.add_argument("--replot", action="store_true", help="redraw scaling.png from the scaling.json in --out")
    args = p.parse_args()
    out = Path(args.out)
    if args.replot:
        plot(json.loads((out / "scaling.json").read_text())["runs"], out / "scaling.png")
        return

    runs = []
    for n in args.sizes:
        for topology in ("star", "ring"):
            for servers in sorted({1, max(1, n // 2)}):
                print(f"N={n} {topology} on {servers} server(s) ...", file=sys.stderr)
                runs.append(measure(n, topology, servers, args.batch_size, args.steps))
    result = {"args": vars(args), "runs": runs, "targets": targets(runs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "scaling.md").write_text(markdown(result))
    plot(runs, out / "scaling.png")
    print(markdown(result))


if __name__ == "__main__":
    main()

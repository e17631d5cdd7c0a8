"""A cost model of sync's exchange per step against N and the network, from measured constants.

    python benchmarks/cost_model.py            (after benchmarks/scaling.py)

The constants: the model's bytes M; the generator's CPU cost per byte fetched or published and
its optimizer step, from scaling.json's star run at the smallest N (1); a Redis round trip r, measured here against a
private server. One store server per node, one worker per node, links of BW each way.

    star  the generator's node takes N gradients in and serves N parameter copies out, and the
          generator fetches N gradients:
              t = max(N M / BW, (N + 1) M c + u) + 2 B r
    ring  every node moves about 2 M each way (its chunks out, everyone's chunk of its slice in,
          the parameters in), the generator one reduced gradient in and one model out; but each
          bucket's chunks are read from N servers, at four points of the step:
              t = max(2 M / BW, 2 M c + u) + 4 B N r

Writes cost-model.json and cost-model.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARAMETERS = 1_199_882  # the MNIST CNN
BUCKETS = 2  # fc1+fc2 and the convolutions, at the default --bucket-mb
SIZES = (1, 2, 4, 8, 16, 64, 256, 1024)
LINKS_GBIT = (1, 10, 100)


def round_trip_s(samples: int = 2000) -> float:
    """The median time of one small Redis command on this machine's loopback."""
    from libe_cnn.redis_server import PrivateRedis

    with PrivateRedis() as address, address.client() as client:
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            client.ping()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def step_ms(topology: str, n: int, bw_bytes_s: float, m: float, c: float, u: float, r: float) -> float:
    if topology == "star":
        return 1000 * (max(n * m / bw_bytes_s, (n + 1) * m * c + u) + 2 * BUCKETS * r)
    return 1000 * (max(2 * m / bw_bytes_s, 2 * m * c + u) + 4 * BUCKETS * n * r)


def crossover(bw_bytes_s: float, m: float, c: float, u: float, r: float) -> int | None:
    """The smallest N at which ring is faster than star."""
    for n in range(2, 1 << 16):
        if step_ms("ring", n, bw_bytes_s, m, c, u, r) < step_ms("star", n, bw_bytes_s, m, c, u, r):
            return n
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scaling", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    # star on one server at the smallest N measured (N=1 in the committed results): the
    # generator fetches N gradients and publishes one model.
    one = min((r for r in json.loads(Path(args.scaling).read_text())["runs"]
               if r["topology"] == "star" and r["servers"] == 1), key=lambda r: r["n"])
    m = 4.0 * PARAMETERS
    parts = one["parts_ms"]
    # The generator's CPU time, not its wall time: on this 2-core machine the wall time also holds
    # the share of the cores the workers take, which a node of its own would not.
    u = parts["update_s"] / 1000
    c = (one["generator_cpu_ms"] / 1000 - u) / ((one["n"] + 1) * m)  # seconds per byte it fetches or publishes
    r = round_trip_s()
    table = {f"{bw} Gbit/s": {t: [round(step_ms(t, n, bw * 1e9 / 8, m, c, u, r), 1) for n in SIZES]
                              for t in ("star", "ring")} for bw in LINKS_GBIT}
    crossings = {f"{bw} Gbit/s": crossover(bw * 1e9 / 8, m, c, u, r) for bw in LINKS_GBIT}
    result = {"model_bytes": m, "generator_s_per_mb": c * 1e6, "update_ms": 1000 * u, "round_trip_ms": 1000 * r,
              "sizes": SIZES, "exchange_ms": table, "ring_faster_from_n": crossings}
    lines = [f"M = {m / 1e6:.1f} MB, the generator {c * 1e9:.2f} ms of CPU per MB fetched or published and "
             f"{1000 * u:.1f} ms per optimizer step (scaling.json, star at N={one['n']}), Redis round trip r = {1000 * r:.3f} ms "
             f"(measured here), B = {BUCKETS} buckets", "",
             "Exchange time per step, ms (the part of the step that compute does not hide):", "",
             "| link | topology | " + " | ".join(f"N={n}" for n in SIZES) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in SIZES) + " |"]
    for link, rows in table.items():
        for topology, values in rows.items():
            lines.append(f"| {link} | {topology} | " + " | ".join(f"{v:.0f}" for v in values) + " |")
    lines += [""] + [f"- {link}: ring is faster from N = {n}" for link, n in crossings.items()]
    out = Path(args.out)
    (out / "cost-model.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cost-model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Time to a Fashion-MNIST test accuracy across hosts on shaped links: the strategies against torch DDP.

    sudo .venv/bin/python -m benchmarks.links --hosts 2 --rates unshaped 1gbit 100mbit --target 0.87
    (estimated from short runs: about 45 minutes here for --hosts 2, as long again for 4 hosts)

For each host count K and link rate, K hosts on this machine (multinode/netns.py: network
namespaces on a bridge, every link shaped by tbf on both ends) run each contender in turn,
each from a fresh start: torch DDP over gloo, one rank per host; and run_libe_cnn.py under
mpiexec, rank 0 (the manager) with worker 1 on host 0 and one worker on each other host, each
host with its own private Redis (--redis-per-host). Every contender trains the same CNN on the
same shards and batches (64 per worker, adam 1e-3, the same seed) and is evaluated on the
whole test set at the same steps; it stops at the end of --epochs, at the first evaluation at
or above --target, or at the first evaluation past --budget-s of training time. Writes
links-h{K...}.json (every curve), .md (a table per host count) and .png (accuracy against
training time, one panel per rate) into --out; --report-only redraws them from the JSON.
Needs root, network namespaces, mpiexec (Open MPI) and mpi4py; refuses in one line otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import DdpStop, Workload, report_saved, trainer_options, write_report  # noqa: E402
from libe_cnn import strategies  # noqa: E402
from libe_cnn.errors import UserError  # noqa: E402
from libe_cnn.plan import DatasetFiles, steps_per_epoch  # noqa: E402
from libe_cnn.strategies.base import SYNC_PERIOD  # noqa: E402
from libe_cnn.strategies.diloco import OUTER_LR, OUTER_MOMENTUM  # noqa: E402
from libe_cnn.strategies.sync import RING_FROM_N  # noqa: E402

DDP = "ddp"
# name -> the trainer's options, or DDP. One line per contender: a new wire type or strategy
# option is one more line here and nothing else.
CONTENDERS: dict[str, str | tuple[str, ...]] = {
    "ddp": DDP,
    "sync-fp32": ("--strategy", "sync", "--wire-dtype", "float32"),
    "sync-bf16": ("--strategy", "sync", "--wire-dtype", "bfloat16"),
    "sync-int8": ("--strategy", "sync", "--wire-dtype", "int8"),
    "diloco-h8": ("--strategy", "diloco", "--sync-period", "8"),
    "diloco-h32": ("--strategy", "diloco", "--sync-period", "32"),
    "diloco-h128": ("--strategy", "diloco", "--sync-period", "128"),
    # "diloco-h32-f4": ("--strategy", "diloco", "--sync-period", "32", "--fragments", "4"),  # streaming diloco
    "param-avg": ("--strategy", "param-avg"),  # its default --sync-period (4)
    "gossip": ("--strategy", "gossip"),  # its default --sync-period (4), random pairs that always exchange
}
RATES = ("unshaped", "1gbit", "100mbit")
PREFIX = "lcnnlink"  # the benchmark's own hosts: a user's `lcnn*` hosts are left alone
BATCH = 64
# Open MPI refuses root and more ranks than a host's cores unless told (as in tests/integration/test_mpi.py).
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
STOP_GRACE_S = 90  # a stopped manager evaluates, writes its summary and ends its ranks in ~10-15 s here
_PORTS = itertools.count(29500)  # gloo's rendezvous port on host 0: a fresh one per DDP run


# --- the schedule every contender shares --------------------------------------------------------

def sync_period(options: str | tuple[str, ...]) -> int | None:
    """The contender's rounds in steps (--sync-period, or its strategy's default), None without rounds."""
    if options == DDP:
        return None
    if "--sync-period" in options:
        return int(options[options.index("--sync-period") + 1])
    name = options[options.index("--strategy") + 1] if "--strategy" in options else strategies.DEFAULT
    option = strategies.strategy(name).option("sync_period")
    return option.default if option is not None else None


def default_eval_every(per_epoch: int, periods: Sequence[int]) -> int:
    """A multiple of every contender's round, so that no evaluation cuts a round short (the
    periodic strategies end their rounds at evaluations), and at least an eighth of an epoch,
    so that a whole-test-set evaluation does not come every few steps."""
    step = math.lcm(*periods) if periods else 1
    return step * max(1, -(-(per_epoch // 8) // step))


def eval_grid(total: int, per_epoch: int, eval_every: int) -> list[int]:
    """The steps at which the trainer evaluates (every eval_every, each epoch end, the last), and so DDP."""
    return [s for s in range(1, total + 1) if s % eval_every == 0 or s % per_epoch == 0 or s == total]


@dataclass(frozen=True)
class Setting:
    """What one contender runs: the workload on K hosts, the evaluation steps and the stopping rule."""

    hosts: int
    n_train: int
    files: dict
    total_steps: int
    grid: tuple[int, ...]
    eval_every: int
    target: float
    budget_s: float
    seed: int
    limit_test: int | None

    @property
    def workload(self) -> Workload:
        return Workload(DatasetFiles(**self.files), n_train=self.n_train, n_workers=self.hosts, batch_size=BATCH,
                        seed=self.seed)

    def timeout_s(self) -> float:
        # Only for a run that hangs: start-up, evaluations and one evaluation interval past the
        # budget fit many times over.
        return 3 * self.budget_s + 900


# --- the clock ------------------------------------------------------------------------------------

def trainer_curve(records: list[dict], grid: Sequence[int]) -> tuple[list[dict], float | None]:
    """(the curve at the grid's evaluations, steady samples/s) from a trainer's metrics records.

    The clock, for every contender (DDP: ddp_curve), is the run's wall time without start-up and
    without the delay its evaluations caused. It starts at the end of the first step (sync, DDP)
    or round (the periodic strategies, whose first record is their first round's end) and
    charges that first step or round at the contender's steady rate. An evaluation delays the
    run by the part of it that outlasts the work done meanwhile: DDP's ranks wait for rank 0's
    evaluation, so all of it; the trainer's workers go on with the next step or round while the
    manager evaluates, so its time less the workers' own time (load, compute, put, exchange) in
    that step or round. Subtracting every evaluation whole, as time_to_accuracy.ours_curve does
    for sync, would count a round that ran during an evaluation as free (measured here: diloco,
    H=8, evaluated every round, came out at ~50,000 samples/s). The contention an evaluation
    causes on this machine's two shared cores stays in (rounds during one took 1.05 s instead of
    0.52 s): that errs against the trainer, by at most its workers' slow-down during evaluations.
    Steady samples/s: the samples after the first record over the clock's time after it, up to
    the last evaluation on the grid (what a stopped run did after it is left out).
    """
    evals = [r for r in records if r.get("event") == "eval"]
    on_grid = [e for e in evals if e["step"] in set(grid)]
    end = on_grid[-1]["step"] if on_grid else math.inf
    steps = [r for r in records if "event" not in r and r["step"] <= end]
    if not steps:
        return [], None
    clock, elapsed = {}, 0.0
    for prev, r in zip(steps, steps[1:]):
        evaluating = sum(e["eval_s"] for e in evals if prev["step"] <= e["step"] < r["step"])
        overlapped = r["sim_load_s"] + r["sim_compute_s"] + r["sim_put_s"] + r["sim_exchange_s"]
        elapsed += r["wall_s"] - prev["wall_s"] - max(0.0, evaluating - overlapped)
        clock[r["step"]] = elapsed
    first, last = steps[0], steps[-1]
    if elapsed > 0:
        steady = (last["samples"] - first["samples"]) / elapsed
    else:  # one record only (stopped after its first round): start-up included, the slower estimate
        steady = first["samples"] / first["wall_s"]
    charge = first["samples"] / steady
    clock[first["step"]] = 0.0
    curve = [{"step": e["step"], "samples": e["samples"], "wall_s": charge + clock[e["step"]],
              "test_accuracy": e["test_accuracy"]} for e in on_grid if e["step"] in clock]
    return curve, steady


def ddp_curve(result: dict, per_step: int) -> tuple[list[dict], float]:
    """DDP's curve on the same clock: _ddp_rank's starts after the warm-up step, charged here at its steady rate."""
    steady = result["samples_per_s"]
    charge = result["warmup"] * per_step / steady
    return ([{"step": p["step"], "samples": p["step"] * per_step, "wall_s": p["wall_s"] + charge,
              "test_accuracy": p["test_accuracy"]} for p in result["curve"]], steady)


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((p for p in curve if p["test_accuracy"] >= target), None)


# --- launching and stopping -------------------------------------------------------------------------

def namespace_pids(hosts) -> set[int]:
    found = " ".join(subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
                     for name in hosts.names)
    return {int(p) for p in found.split()}


def clear_hosts(hosts, grace: float = 5.0) -> int:
    """Stop whatever still runs inside the hosts (SIGTERM, then SIGKILL): the next contender starts
    on empty hosts. Returns how many processes had to be stopped (0 after a clean run)."""
    leftover = namespace_pids(hosts)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in namespace_pids(hosts):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while namespace_pids(hosts) and time.monotonic() < deadline:
            time.sleep(0.1)
    return len(leftover)


def _default_sigint() -> None:
    # The child takes SIGINT at its default even when this benchmark runs with it ignored (`cmd &`).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def rank_zero(mpiexec_pid: int):
    """The manager's process (MPI rank 0) under this mpiexec, or None while it is not up."""
    import psutil

    for child in psutil.Process(mpiexec_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            # The trainer itself: rank 0's private redis-server inherits its environment, rank
            # variable included, and a SIGINT there would take the run's store away.
            if (child.environ().get("OMPI_COMM_WORLD_RANK") == "0"
                    and any(part.endswith("run_libe_cnn.py") for part in child.cmdline())):
                return child
    return None


def stop_trainer(proc: subprocess.Popen) -> None:
    """Stop a trainer launch in order: SIGINT to the manager (rank 0) only.

    Why not the mpiexec process group: Open MPI puts every rank in a process group of its own,
    and mpiexec, on SIGINT, kills the whole job with SIGTERM, so the manager never writes its
    summary. The manager alone handles Ctrl-C (its simulators ignore it): it stops them through
    MPI, evaluates the parent, writes summary.json (completed false, with the bytes through the
    store) and every rank and private Redis exits. Why not --max-steps from a short measurement:
    the step at which a contender reaches the target is not known in advance, and a measurement
    run per contender costs a start-up and at least a round (128 steps for diloco-h128).
    """
    manager = rank_zero(proc.pid)
    if manager is not None:
        with contextlib.suppress(Exception):
            manager.send_signal(signal.SIGINT)
    else:  # not up yet: nothing was trained that would be lost
        os.killpg(proc.pid, signal.SIGTERM)


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's complete lines (the last may be half written while the run goes on)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def run_trainer(hosts, s: Setting, options: tuple[str, ...], work: Path) -> dict:
    """One run_libe_cnn.py launch across the hosts, stopped as the rule says; its measurements."""
    run_dir, log = work / "run", work / "trainer.log"
    limits = ["--limit-train", str(s.n_train)] + (["--limit-test", str(s.limit_test)] if s.limit_test else [])
    epochs = -(-s.total_steps // steps_per_epoch(s.n_train, s.hosts, BATCH))
    launch = [shutil.which("mpiexec"), *hosts.mpiexec_options(slots=[2] + [1] * (s.hosts - 1)), "-n",
              str(s.hosts + 1), sys.executable, str(ROOT / "run_libe_cnn.py"), "--comms", "mpi", "--redis-bind",
              hosts.address(0), "--redis-per-host", "--dataset", "fashion-mnist", *trainer_options(s.workload),
              "--epochs", str(epochs), "--max-steps", str(s.total_steps), "--eval-every", str(s.eval_every),
              "--eval-subset", "0", *limits, *options, "--run-dir", str(run_dir)]
    env = {**{k: v for k, v in os.environ.items() if k != "REDIS_URL"}, **MPI_ENV}
    stopped, signalled_at, seen, forced, stop_step = "epochs", None, 0, "", s.total_steps
    started = time.monotonic()
    with open(log, "w") as out:
        # A session of its own: a terminal's Ctrl-C reaches this process only, which then stops the run.
        proc = hosts.popen(0, launch, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                           start_new_session=True, preexec_fn=_default_sigint)
        try:
            while proc.poll() is None:
                time.sleep(0.25)
                if signalled_at is None:
                    records = read_records(run_dir / "metrics.jsonl")
                    curve, _ = trainer_curve(records, s.grid)
                    if len(curve) > seen:  # a new evaluation on the grid: the only place a contender stops
                        seen, point = len(curve), curve[-1]
                        reason = ("target" if point["test_accuracy"] >= s.target else
                                  "budget" if point["wall_s"] > s.budget_s else None)
                        if reason and point["step"] < s.total_steps:
                            stopped, signalled_at, stop_step = reason, time.monotonic(), point["step"]
                            stop_trainer(proc)
                if signalled_at and time.monotonic() - signalled_at > STOP_GRACE_S:
                    # The curve is in metrics.jsonl already; only the summary (bytes) is lost with the job.
                    forced = f"the manager had not ended {STOP_GRACE_S} s after SIGINT: the job was killed"
                    os.killpg(proc.pid, signal.SIGTERM)  # mpiexec then kills every rank
                    proc.wait(timeout=30)
                elif time.monotonic() - started > s.timeout_s():
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=30)
                    raise RuntimeError(f"run_libe_cnn.py did not end in time (log: {tail(log)})")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    summary_path = run_dir / "summary.json"
    if forced:
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    elif not summary_path.exists():
        raise RuntimeError(f"run_libe_cnn.py exited with {proc.returncode} and no summary: {tail(log)}")
    else:
        summary = json.loads(summary_path.read_text())
        if proc.returncode not in (0, 130) or summary.get("error"):
            raise RuntimeError(f"run_libe_cnn.py exited with {proc.returncode}: {summary.get('error') or tail(log)}")
    curve, steady = trainer_curve(read_records(run_dir / "metrics.jsonl"), s.grid)
    # Evaluations the run still made between the decision and the stop (a round ends meanwhile) are not its curve.
    curve = [p for p in curve if p["step"] <= stop_step]
    keep = ("completed", "steps", "samples", "wall_s", "samples_per_s", "steady_samples_per_s", "test_accuracy",
            "store_bytes_per_step", "store_bytes_per_sample", "busiest_server_bytes_per_step", "redis_servers",
            "worker_servers", "exchanges", "wire_dtype")
    return {"curve": curve, "steady_samples_per_s": steady, "bytes_per_sample": summary.get("store_bytes_per_sample"),
            "stopped": stopped, "summary": {k: summary[k] for k in keep if k in summary},
            **({"note": f"{forced} (log: {tail(log)})"} if forced else {})}


def ddp_bytes_per_sample(parameters: int, k: int) -> float:
    """Gradient bytes one rank sends (and receives) per step in a ring all-reduce of float32
    gradients, 4 P x 2(K-1)/K, per sample of the step's K x 64; 0 for one rank."""
    return 4 * parameters * 2 * (k - 1) / k / (k * BATCH)


def run_ddp(hosts, s: Setting, work: Path) -> dict:
    """torch DDP over gloo, rank i inside host i (one thread each), the master on host 0."""
    spec, result = work / "ddp-spec.json", work / "ddp-result.json"
    spec.write_text(json.dumps({"setting": asdict(s), "master_addr": hosts.address(0), "port": next(_PORTS),
                                "result": str(result)}))
    # gloo binds to the address of the interface named here; unset, it picks 127.0.0.1 and the ranks never meet.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": hosts.interface, "OMP_NUM_THREADS": "1"}
    procs, logs = [], [work / f"ddp-rank{i}.log" for i in range(s.hosts)]
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(hosts.popen(i, [sys.executable, "-m", "benchmarks.links", "ddp-rank", str(spec), str(i)],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True))
        deadline = time.monotonic() + s.timeout_s()
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:  # the others would wait for it until gloo's 30-minute timeout
                raise RuntimeError(f"DDP rank {failed[0]} exited with {procs[failed[0]].returncode}: "
                                   f"{tail(logs[failed[0]])}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"DDP did not end in time: {tail(logs[0])}")
            time.sleep(0.25)
        if any(p.returncode for p in procs):
            i = next(i for i, p in enumerate(procs) if p.returncode)
            raise RuntimeError(f"DDP rank {i} exited with {procs[i].returncode}: {tail(logs[i])}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    got = json.loads(result.read_text())
    curve, steady = ddp_curve(got, s.hosts * BATCH)
    last = curve[-1] if curve else None
    stopped = ("epochs" if got["steps"] >= s.total_steps else
               "target" if last and last["test_accuracy"] >= s.target else "budget")
    return {"curve": curve, "steady_samples_per_s": steady, "stopped": stopped, "steps": got["steps"]}


def ddp_rank_main(argv: Sequence[str]) -> int:
    """`python -m benchmarks.links ddp-rank SPEC RANK`: one DDP rank, started inside its host by run_ddp."""
    from benchmarks.baselines import _ddp_rank
    from mnist.data import load_split

    spec, rank = json.loads(Path(argv[0]).read_text()), int(argv[1])
    s = Setting(**{**spec["setting"], "grid": tuple(spec["setting"]["grid"])})
    test_set = load_split(DatasetFiles(**s.files), train=False, limit=s.limit_test) if rank == 0 else None

    class ResultFile:
        """What _ddp_rank's rank 0 puts: written to the spec's result file for run_ddp to read."""

        def put(self, result: dict) -> None:
            Path(spec["result"]).write_text(json.dumps(result))

    _ddp_rank(rank, s.workload, 1, s.total_steps - 1, 1, spec["port"], ResultFile(), None, test_set,
              master_addr=spec["master_addr"], eval_steps=frozenset(s.grid),
              stop=DdpStop(target=s.target, budget_s=s.budget_s))
    return 0


def tail(path: Path, lines: int = 6) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"


# --- one contender, all of them ----------------------------------------------------------------------

def measure(hosts, s: Setting, name: str, parameters: int) -> dict:
    """Run one contender from a fresh start and summarise it; a failure is recorded, not raised."""
    options = CONTENDERS[name]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"links-{name}-") as tmp:
        try:
            if options == DDP:
                got = run_ddp(hosts, s, Path(tmp))
                got["bytes_per_sample"] = ddp_bytes_per_sample(parameters, s.hosts)
            else:
                got = run_trainer(hosts, s, options, Path(tmp))
        except Exception as e:  # one contender failing leaves the others' measurements standing
            got = {"error": str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"}
        finally:
            # Nothing of this contender may run into the next one's time (or outlive the benchmark).
            leftover = clear_hosts(hosts)
    got.update(name=name, options=options, run_s=time.monotonic() - started, leftover_processes=leftover)
    if "error" not in got:
        hit, last = first_reaching(got["curve"], s.target), (got["curve"] or [None])[-1]
        got.update(time_to_target_s=hit and hit["wall_s"], target_step=hit and hit["step"],
                   final_accuracy=last and last["test_accuracy"], final_step=last and last["step"],
                   training_s=last and last["wall_s"])
    return got


@contextlib.contextmanager
def saved_as_it_goes(path: Path, result: dict) -> Iterator[Callable[[], None]]:
    """A `save()` that writes the results so far: an interrupted benchmark keeps what it measured."""
    def save() -> None:
        path.write_text(json.dumps(result, indent=2) + "\n")
    try:
        yield save
    finally:
        save()


def run(args: argparse.Namespace, data: Path) -> None:
    from mnist.data import locate, read_idx
    from mnist.model import build_model
    from multinode.netns import Hosts

    files = locate("fashion-mnist", None)
    n_train = args.limit_train or len(read_idx(files.paths["train_labels"]))
    parameters = sum(p.numel() for p in build_model(args.seed).parameters())
    periods = [p for p in (sync_period(CONTENDERS[c]) for c in args.contenders) if p]
    result = {"args": vars(args), "parameters": parameters, "settings": {}, "results": {}}
    with saved_as_it_goes(data, result) as save:
        for k in args.hosts:
            per_epoch = steps_per_epoch(n_train, k, BATCH)
            if per_epoch < 1:
                raise UserError(f"--limit-train {n_train} gives {k} workers less than a batch of {BATCH} each")
            total = per_epoch * args.epochs
            every = args.eval_every or default_eval_every(per_epoch, periods)
            s = Setting(hosts=k, n_train=n_train, files={"name": files.name, "paths": files.paths}, total_steps=total,
                        grid=tuple(eval_grid(total, per_epoch, every)), eval_every=every, target=args.target,
                        budget_s=args.budget_s, seed=args.seed, limit_test=args.limit_test)
            result["settings"][str(k)] = {**asdict(s), "steps_per_epoch": per_epoch}
            for rate in args.rates:
                with Hosts(k, rate=None if rate == "unshaped" else rate, prefix=args.prefix) as hosts:
                    for name in args.contenders:
                        print(f"{k} hosts, {rate}: {name} ...", file=sys.stderr, flush=True)
                        got = measure(hosts, s, name, parameters)
                        result["results"].setdefault(str(k), {}).setdefault(rate, {})[name] = got
                        print(f"  {one_line(got, s.target)}", file=sys.stderr, flush=True)
                        save()


def one_line(got: dict, target: float) -> str:
    if "error" in got:
        return f"failed: {got['error']}"
    hit = f"{target:.0%} at {got['time_to_target_s']:.1f} s" if got["time_to_target_s"] is not None else "not reached"
    return (f"{hit}; final {got['final_accuracy']:.2%} at step {got['final_step']}; "
            f"{got['steady_samples_per_s']:.0f} samples/s; {kilobytes(got['bytes_per_sample'])} kB/sample; "
            f"stopped: {got['stopped']}; {got['run_s']:.0f} s with start-up")


def kilobytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e3:.1f}"


# --- the report ------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    args, settings = result["args"], result["settings"]
    target = args["target"]
    pct = f"{target:.0%}"
    lines = [f"# Time to {pct} Fashion-MNIST test accuracy across hosts", "",
             f"`python -m benchmarks.links --hosts {' '.join(map(str, args['hosts']))} --rates {' '.join(args['rates'])} "
             f"--target {target} --epochs {args['epochs']} --budget-s {args['budget_s']:g}`", "",
             "K hosts on this 2-core machine (network namespaces on a bridge, multinode/netns.py; a rate is tbf on both "
             "ends of every link, unshaped is veth speed), one worker per host, all sharing the same two cores. "
             f"Every contender: {BATCH} per worker, adam 1e-3, seed {args['seed']}, the same shards and batches, at most "
             f"{args['epochs']} epoch(s); evaluated on the "
             + (f"first {args['limit_test']} test images" if args["limit_test"] else "whole test set")
             + " at the same steps; stopped at the first evaluation at or above the target, or at the first one past "
             f"{args['budget_s']:g} s of training.",
             "",
             "- **time**: training wall time (s) at the first evaluation at or above the target. The clock starts at the "
             "end of the first step (DDP, sync) or round (the periodic strategies), so start-up is out, and charges that "
             "step or round at the contender's steady rate; the delay evaluations caused is out: all of each of DDP's "
             "(its ranks wait for rank 0's), the part of each of the trainer's that outlasted the workers' own next step "
             "or round (they go on while the manager evaluates; the slow-down an evaluation causes them on the shared "
             "cores stays in, which errs against the trainer). *not reached*: not within the epochs or the budget. "
             "**x DDP**: that time over DDP's at the same rate.",
             "- **samples/s**: steady: after the first step or round, on the same clock.",
             "- **kB/sample**: the trainer's `store_bytes_per_sample` (every byte into and out of its Redis servers, one "
             "per host, per sample: a gradient that goes worker -> server -> generator counts twice; a run that ends its "
             "epoch also moves a checkpoint, for which the periodic strategies fetch every worker's parameters and "
             "optimizer state (3 x 4.8 MB each, put and fetched: about a third of diloco-h128's count over one epoch at "
             "N=2)); DDP's, the "
             f"gradient bytes one rank sends (as many it receives) per step in a ring all-reduce, 4 B x "
             f"{result['parameters']} parameters x 2(K-1)/K, per sample of the step's K x {BATCH}.",
             "- **final**: test accuracy at the last evaluation on the common steps.",
             "- Contenders: " + "; ".join(f"`{name}`: " + ("torch DDP over gloo, one rank per host, one thread"
                                                           if CONTENDERS.get(name) == DDP else
                                                           " ".join(CONTENDERS.get(name, ("?",))))
                                          for name in args["contenders"])
             + f". diloco: outer lr {OUTER_LR.default}, Nesterov momentum {OUTER_MOMENTUM.default} (the defaults); "
             f"param-avg and gossip at their default --sync-period {SYNC_PERIOD.default}. Trainer: `mpiexec` with rank 0 (manager) and worker 1 on host 0, one worker on each "
             "other host, `--redis-per-host`, one thread per worker; sync's --reduce-topology at its default (star, "
             f"ring from {RING_FROM_N} workers under MPI).", ""]
    for k, by_rate in result["results"].items():
        st = settings[k]
        periods = {n: sync_period(CONTENDERS[n]) for n in args["contenders"] if n in CONTENDERS}
        cut = [f"{n} (H={h})" for n, h in periods.items() if h and st["eval_every"] % h]
        ends = [f"{n}'s last round of an epoch is {st['steps_per_epoch'] % h} steps"
                for n, h in periods.items() if h and st["steps_per_epoch"] % h]
        lines += [f"## {k} hosts (N={k})", "",
                  f"{st['steps_per_epoch']} steps per epoch; evaluations every {st['eval_every']} steps and at epoch "
                  "ends (the periodic strategies' rounds end at evaluations"
                  + (f": cut short for {', '.join(cut)}" if cut else "") + ")"
                  + (f"; {'; '.join(ends)}" if ends else "") + ".", ""]
        rates = list(by_rate)
        head = ["contender"] + [f"{r}: {col}" for r in rates
                                for col in (f"time to {pct} s", "x DDP", "samples/s", "kB/sample", "final")]
        lines += ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
        names = list(dict.fromkeys(n for r in rates for n in by_rate[r]))
        for name in names:
            cells = [name]
            for r in rates:
                got, ddp = by_rate[r].get(name), by_rate[r].get(DDP)
                if got is None:
                    cells += ["-"] * 5
                elif "error" in got:
                    cells += ["failed"] + ["-"] * 4
                else:
                    t = got["time_to_target_s"]
                    base = ddp and "error" not in ddp and ddp["time_to_target_s"]
                    cells += [f"{t:.1f}" if t is not None else "not reached",
                              f"{t / base:.2f}" if t is not None and base else "-",
                              f"{got['steady_samples_per_s']:.0f}", kilobytes(got["bytes_per_sample"]),
                              f"{got['final_accuracy']:.2%}" if got["final_accuracy"] is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- failed: {name} at {r}: {got['error']}" for r in rates for name, got in by_rate[r].items()
                 if "error" in got]
        notes += [f"- {name} at {r}: {got['note']}" for r in rates for name, got in by_rate[r].items() if "note" in got]
        lines += [""] + notes + ([""] if notes else [])
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = result["args"]["target"]
    rows = list(result["results"].items())
    cols = max((len(by_rate) for _, by_rate in rows), default=1)
    fig, axes = plt.subplots(len(rows) or 1, cols, figsize=(4.6 * cols, 3.8 * max(len(rows), 1)), squeeze=False,
                             sharey=True)
    for row, (k, by_rate) in enumerate(rows):
        for col, (rate, contenders) in enumerate(by_rate.items()):
            ax = axes[row][col]
            for name, got in contenders.items():
                points = got.get("curve") or []
                if points:
                    ax.plot([p["wall_s"] for p in points], [100 * p["test_accuracy"] for p in points], marker="o",
                            markersize=3, label=name, linestyle="--" if name == DDP else "-")
            ax.axhline(100 * target, color="grey", linewidth=0.8, linestyle=":")
            ax.set_title(f"{k} hosts, {rate}", fontsize=10)
            ax.set_xlabel("training wall time (s; start-up and evaluations excluded)")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("test accuracy (%)")
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command line --------------------------------------------------------------------------------

def refusal(args: argparse.Namespace) -> str | None:
    """Why this machine cannot run the benchmark, in one line; None when it can."""
    if os.geteuid() != 0:
        return "benchmarks.links needs root (network namespaces, veths, a bridge): run it with sudo"
    if missing := [t for t in ("ip", "unshare", "mpiexec", "redis-server") if not shutil.which(t)]:
        return f"`{missing[0]}` not found: install iproute2, util-linux, Open MPI and redis-server (make setup-mpi)"
    if any(r != "unshaped" for r in args.rates) and not shutil.which("tc"):
        return "shaped --rates need `tc`: install iproute2"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed: make setup-mpi"
    probe = f"{args.prefix}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"network namespaces are not available here: `ip netns add` says {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ddp-rank"]:
        return ddp_rank_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.links", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 4], help="host counts (default: %(default)s)")
    p.add_argument("--rates", nargs="+", default=list(RATES),
                   help="link rates, tc syntax or `unshaped` (default: %(default)s)")
    p.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    p.add_argument("--target", type=float, default=0.87, help="test accuracy (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1, help="at most this many epochs each (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="stop at the first evaluation past this much training time (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (default: a multiple of every contender's round, at least 1/8 epoch)")
    p.add_argument("--limit-train", type=int, default=None, help="smoke runs: the first K training samples only")
    p.add_argument("--limit-test", type=int, default=None, help="smoke runs: evaluate on the first K test samples")
    p.add_argument("--prefix", default=PREFIX, help="the hosts' name prefix (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true", help="redraw the table and plot from the saved results")
    args = p.parse_args(argv)
    data = Path(args.out) / f"links-h{'-'.join(map(str, args.hosts))}.json"
    if args.report_only:
        print(report_saved(data, markdown, plot))
        return 0
    if min(args.hosts) < 1 or args.epochs < 1 or args.budget_s <= 0 or (args.eval_every or 1) < 1:
        p.error("--hosts, --epochs, --budget-s and --eval-every must be positive")
    why = refusal(args)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    data.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(args, data)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The hosts are gone with everything that ran in them (Hosts' exit); what was measured is saved.
        print(f"interrupted: the results so far are in {data} (--report-only draws them)", file=sys.stderr)
        return 130
    print(write_report(data, markdown, plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train one CNN with N data-parallel libEnsemble workers.

    python run_libe_cnn.py -n 4 --dataset fashion-mnist
    mpiexec -n 5 python run_libe_cnn.py --comms mpi --redis-host HOST ...

The generator on the manager holds the parent model; N persistent simulators each train
on one shard and stream gradients to it through ProxyStore on Redis.
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":
    # Ctrl-C while torch and libEnsemble are still being imported (a few seconds): one line, no
    # traceback. main() puts Python's own handler back once they are.
    signal.signal(signal.SIGINT, lambda *_: (print("interrupted while starting: nothing was run", file=sys.stderr),
                                             os._exit(130)))
elif __name__ == "__mp_main__":
    # A simulator (spawned processes import this as __mp_main__): Ctrl-C in a terminal reaches every
    # process of the job, and the manager alone handles it, stopping the simulators in order. A
    # manager that is killed outright cannot: each simulator then ends itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from libe_cnn.parent_watch import exit_with_parent

    exit_with_parent()

import dataclasses
import importlib.util
import json
import logging
import multiprocessing
import re
import shlex
import socket
from contextlib import ExitStack, chdir
from pathlib import Path

from libe_cnn import strategies
from libe_cnn.cli import config_from_args
from libe_cnn.config import TrainConfig
from libe_cnn.errors import UserError


def prepare_run_dir(path: Path) -> None:
    try:
        if path.exists() and any(path.iterdir()):
            raise UserError(f"run directory {path} already exists and is not empty: choose another --run-dir "
                            "(or continue it with --resume)")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".writable"  # a directory can exist and still refuse files (read-only mounts)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot create run directory {path}: {e.strerror or e}; choose another --run-dir") from None


def resume_point(plan) -> tuple[int, tuple[int, ...]]:
    """Check that the run's checkpoint can continue under `plan`: its step and each worker's next batch."""
    from libe_cnn.checkpoint import load_checkpoint

    cfg = plan.config
    checkpoint = load_checkpoint(Path(cfg.run_dir))
    if checkpoint["strategy"] != cfg.strategy or len(checkpoint["positions"]) != cfg.n_workers:
        raise UserError(f"cannot resume {cfg.run_dir}: its checkpoint is of --strategy {checkpoint['strategy']} "
                        f"with {len(checkpoint['positions'])} workers, its config.json says otherwise")
    total = plan.recorded_steps
    if checkpoint["step"] >= total:
        raise UserError(f"the run in {cfg.run_dir} already took its {total} steps: "
                        "raise --epochs or --max-steps to train it further")
    return checkpoint["step"], tuple(int(p) for p in checkpoint["positions"])


def connect_redis(cfg: TrainConfig, stack: ExitStack):
    """The run's Redis servers: the given one (left running) or private ones (stopped at exit)."""
    import redis

    from libe_cnn.cli import TLS_FILES
    from libe_cnn.redis_server import PrivateRedis
    from libe_cnn.store import RedisAddress

    if cfg.redis_host is None:
        addresses = [stack.enter_context(PrivateRedis(cfg.redis_bind or "127.0.0.1", cfg.redis_port))
                     for _ in range(cfg.redis_servers)]
        for address in addresses:  # a private server that is gone took the keys with it
            stack.callback(_delete_keys_or_warn, address, cfg.run_id, True)
        return addresses[0], tuple(addresses[1:])
    address = RedisAddress(cfg.redis_host, cfg.redis_port, cfg.redis_password, cfg.redis_user, cfg.redis_db,
                           cfg.redis_tls, cfg.redis_tls_options)
    where = f"Redis at {cfg.redis_host}:{cfg.redis_port}"
    for name, path in cfg.redis_tls_options.items():
        if name in TLS_FILES and not os.path.exists(path):
            raise UserError(f"REDIS_URL's {name} {path} does not exist")
    try:
        with address.client(socket_connect_timeout=5) as client:
            client.ping()
    except redis.AuthenticationError:
        raise UserError(refused_login(cfg, where)) from None
    except redis.ResponseError as e:  # a server before Redis 6 (NOAUTH), or a user who may not PING (NOPERM)
        raise UserError(f"{where}: {e} (check --redis-user and --redis-password, or REDIS_URL)") from None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        tls = tls_failure(e)
        if tls:
            raise UserError(f"the TLS handshake with {where} failed: {tls} (check REDIS_URL's ssl_ca_certs, "
                            "and that the server's certificate names the host)") from None
        if cfg.redis_tls:
            raise UserError(f"cannot reach {where} over TLS: {e} (is it up, and does that port take TLS?)") from None
        raise UserError(f"cannot reach {where}: start it (rediss:// if it takes TLS only), or "
                        f"{redis_source(cfg)} to use a private server") from None
    # Whatever happens, the run leaves none of its keys behind.
    stack.callback(_delete_keys_or_warn, address, cfg.run_id, False)
    return address, ()


def redis_source(cfg: TrainConfig) -> str:
    """How to stop naming the server: whichever of REDIS_URL and --redis-host named it."""
    url = os.environ.get("REDIS_URL")
    if url:
        from libe_cnn.cli import parse_redis_url

        try:
            if parse_redis_url(url)["redis_host"] == cfg.redis_host:
                return "unset REDIS_URL"
        except UserError:
            pass
    return "omit --redis-host"


def refused_login(cfg: TrainConfig, where: str) -> str:
    """Why the server turned the run away: no password, the default user's, or an ACL user's."""
    if cfg.redis_password is None:
        return (f"{where} asks for a password: give it in REDIS_URL, REDISCLI_AUTH or --redis-password "
                "(and an ACL user in REDIS_URL or --redis-user)")
    if cfg.redis_user is None:
        return (f"{where} refused the password of its default user (check --redis-password or REDIS_URL; "
                "an ACL user goes in --redis-user or REDIS_URL's USER)")
    return (f"{where} refused the user or password (user {cfg.redis_user!r}: check --redis-user and "
            "--redis-password, or REDIS_URL)")


def tls_failure(error: BaseException) -> str | None:
    """What went wrong in a TLS handshake that redis-py reports as a connection error, if it was one."""
    import ssl

    while error is not None:
        if isinstance(error, ssl.SSLError):
            return getattr(error, "verify_message", None) or error.reason or str(error)
        error = error.__cause__ or error.__context__
    return None


def _delete_keys_or_warn(address, run_id: str, private: bool) -> None:
    """At exit, cleaning up must not hide why the run ended; a failure is a warning."""
    import redis

    from libe_cnn.store import delete_run_keys

    try:
        delete_run_keys(address, run_id)
    except redis.ConnectionError:
        if not private:  # a private server that is gone took the keys with it
            print(f"warning: could not delete this run's keys ({run_id}:*) from Redis at "
                  f"{address.host}:{address.port}: unreachable", file=sys.stderr)
    except redis.RedisError as e:
        print(f"warning: could not delete this run's keys ({run_id}:*) from Redis: {e}", file=sys.stderr)


def run_ensemble(plan) -> int:
    """Run the generator on the manager and N persistent simulators; returns libEnsemble's flag."""
    from libensemble import Ensemble
    from libensemble import logger as libe_logger
    from libensemble.alloc_funcs.start_only_persistent import only_persistent_gens
    from libensemble.specs import AllocSpecs, ExitCriteria, GenSpecs, LibeSpecs, SimSpecs

    from gen_funcs.parent_model import parent_model_gen
    from libe_cnn.plan import GEN_OUT, SIM_OUT
    from sim_funcs.child_trainer import child_trainer_sim

    cfg = plan.config
    # Tracebacks go to ensemble.log only; the terminal gets one line (see main). A log that can no
    # longer be written (a full disk) must not print tracebacks of its own instead.
    libe_logger.set_stderr_level("CRITICAL")
    logging.raiseExceptions = False
    libE_specs = LibeSpecs(
        comms=cfg.comms,
        # The run directory holds the run's own record of a failure (summary.json, its checkpoint):
        # libEnsemble's copies of its history and persis_info would only be left behind.
        save_H_and_persis_on_abort=False,
        gen_on_manager=True,
        save_H_on_completion=True,
        **({"nworkers": cfg.n_workers} if cfg.comms == "local" else {}),
    )
    ensemble = Ensemble(
        libE_specs=libE_specs,
        gen_specs=GenSpecs(gen_f=parent_model_gen, persis_in=[name for name, _ in SIM_OUT],
                           outputs=GEN_OUT, user={"plan": plan}),
        sim_specs=SimSpecs(sim_f=child_trainer_sim, inputs=[name for name, _ in GEN_OUT],
                           persis_in=[name for name, _ in GEN_OUT], outputs=SIM_OUT, user={"plan": plan}),
        # alt_type: simulators are persistent too, so at the end they get PERSIS_STOP
        # (and return) rather than a STOP that leaves an mpirun job waiting.
        # async_return + active_recv_gen: each simulator's row reaches the generator as soon
        # as it is sent, so its gradient is fetched while the others still compute.
        alloc_specs=AllocSpecs(alloc_f=only_persistent_gens,
                               user={"alt_type": True, "async_return": True, "active_recv_gen": True}),
        # The generator ends the run when it has taken its last step; this only bounds
        # the history in case it never does. It must never trip first: the generator sends
        # at most N rows per step (async: N to start, then one per gradient).
        exit_criteria=ExitCriteria(gen_max=cfg.n_workers * (plan.total_steps + 2)),
    )
    _, _, flag = ensemble.run()
    return flag


def pipeline_split(cfg: TrainConfig) -> str:
    """Where the stages are cut, as layer numbers (time and memory are measured here, once)."""
    from libe_cnn.pipeline.split import resolve_split
    from mnist.model import build_model

    return resolve_split(cfg, build_model(cfg.seed, cfg.dropout, cfg.dataset, cfg.model),
                         f"--model {cfg.model} for {cfg.dataset}")


def prepare(cfg: TrainConfig, stack: ExitStack, hosts: int = 1):
    """On the manager only: find the data, connect Redis, plan the run, create its directory
    (`hosts`: how many hosts the run's processes are on)."""
    from libe_cnn.plan import make_plan
    from libe_cnn.runtime import process_memory
    from mnist.data import check_dataset, locate

    process = process_memory()  # what every process of the run holds before it reads any data
    check_devices(cfg)
    if cfg.parallelism == "pipeline":
        cfg.split = pipeline_split(cfg)
    files = locate(cfg.dataset, cfg.data_dir)  # before any worker exists: one download at most
    n_total = check_dataset(files)
    plan = make_plan(cfg, files, n_total)
    parameters = parameter_count(cfg)
    if cfg.comms == "local":  # under MPI the workers' memory is on their own nodes
        check_memory(plan, n_total, process, parameters)
    start = ""
    if cfg.resume:
        step, positions = resume_point(plan)
        plan = dataclasses.replace(plan, resume_positions=positions)
        start = f"resuming after step {step}, "
    shm_dir = choose_transport(cfg, hosts, parameters)
    primary, more = connect_redis(cfg, stack)
    plan = dataclasses.replace(plan, redis=primary, more_redis=more, shm_dir=shm_dir)
    run_dir = Path(cfg.run_dir)
    if not cfg.resume:
        prepare_run_dir(run_dir)
    cfg.save(run_dir / "config.json")  # every setting, there rather than on the screen
    layout = (f"{cfg.replicas} pipeline{'s' if cfg.replicas > 1 else ''} of {cfg.stages} stages (layers cut before "
              f"{cfg.split}), {cfg.microbatches} micro-batches, {cfg.schedule}" if cfg.parallelism == "pipeline" else
              f"{cfg.n_workers} workers")
    print(f"{layout} x {cfg.batch_size} samples, {plan.steps_per_epoch} steps/epoch, "
          f"{start}{schedule_line(plan)}", file=sys.stderr)
    print(f"run directory: {run_dir} (settings in config.json)", file=sys.stderr)
    tested_on = f" (evaluating on the first {cfg.limit_test} test samples)" if cfg.limit_test else ""
    print(f"data: {data_source(files)}{tested_on}", file=sys.stderr)
    print(f"evaluations: {evaluation_line(plan)}", file=sys.stderr)
    if shm_dir:
        print(f"transport: shared memory in {shm_dir} (tokens and heartbeats through Redis)", file=sys.stderr)
    for warning in filter(None, [oversubscription_warning(cfg), *strategies.option_warnings(cfg)]):
        print(f"warning: {warning}", file=sys.stderr)
    return plan


# Buffers of the model's size a run may hold in shared memory at once, per worker and for the
# generator: a step's gradients and parameters, the next step's, and a worker's state at a checkpoint.
SHM_COPIES = 4


def choose_transport(cfg: TrainConfig, hosts: int, parameters: int) -> str | None:
    """The shared-memory directory the run's buffers will go to, or None: Redis.

    `hosts`: how many hosts the run's processes are on; `parameters`: the model's. auto falls
    back to Redis in one line when shared memory cannot serve (several hosts, too little room on
    the tmpfs); shm refuses.
    """
    from libe_cnn import shm

    if cfg.transport == "redis":
        return None
    if cfg.transport == "auto" and cfg.comms == "mpi":
        # One in three MPI runs over shared memory lost a worker's last row here (the generator then
        # waited until the start-up grace ran out); until that is understood MPI runs stay on Redis.
        print("transport: redis (under --comms mpi shared memory is taken only with --transport shm)",
              file=sys.stderr)
        return None
    need = SHM_COPIES * (cfg.n_workers + 1) * 4 * parameters
    free = shm.free_bytes()
    problem = (f"the run's processes are on {hosts} hosts" if hosts > 1 else
               f"{shm.root()} has {free / 2**20:.0f} MB free and the run needs about {need / 2**20:.0f} MB there"
               if free < need else None)
    if problem is None:
        return str(shm.run_directory(cfg.run_id))
    if cfg.transport == "shm":
        raise UserError(f"--transport shm: {problem}; use --transport redis")
    print(f"transport: redis, since {problem}", file=sys.stderr)
    return None


def open_transport(plan, stack: ExitStack) -> None:
    """Make the run's shared-memory directory, if it has one; it goes when `stack` closes (the
    run's end, Ctrl-C, a failure)."""
    from libe_cnn import shm
    from libe_cnn.owned_dirs import remove_orphans

    if plan.shm_dir is None:
        return
    remove_orphans(shm.root(), shm.PREFIX)  # what runs killed outright left on this host
    shm.create(Path(plan.shm_dir))
    stack.callback(shm.remove, Path(plan.shm_dir))


def parameter_count(cfg: TrainConfig) -> int:
    from mnist.model import build_model

    return sum(p.numel() for p in build_model(cfg.seed, cfg.dropout, cfg.dataset, cfg.model).parameters())


def check_memory(plan, n_total: int, process: tuple[int, int], parameters: int) -> None:
    """Refuse, before any worker starts, a run this machine's memory cannot hold (`process`: process_memory()
    before the data was read)."""
    from libe_cnn.footprint import TEST_SAMPLES, check_fits, estimate
    from libe_cnn.runtime import available_memory

    cfg = plan.config
    n_test = min(cfg.limit_test or TEST_SAMPLES[cfg.dataset], TEST_SAMPLES[cfg.dataset])
    private, shared = process
    check_fits(estimate(private, cfg.dataset, n_total, plan.n_train, n_test, cfg.n_workers, parameters, shared),
               available_memory())


def evaluation_line(plan) -> str:
    """When the parent is tested, and on what."""
    cfg, every = plan.config, plan.eval_every
    ends = "at each epoch end and the last step on the whole test set"
    if not every:
        return ends
    on = f"the first {cfg.eval_subset} test samples" if cfg.eval_subset else "the whole test set"
    return f"every {every} steps on {on}, and {ends}"


def schedule_line(plan) -> str:
    """What the run will take, in the unit its progress counts, and which samples it uses."""
    cfg = plan.config
    steps = f"{plan.recorded_steps} {plan.step_unit}s"
    if plan.strategy.counts_gradients:
        steps += f" ({plan.total_steps} per worker)"
    used = plan.samples_per_epoch
    line = f"{steps} on {used} {cfg.dataset} samples per epoch"
    if used < plan.n_train:
        # Every worker takes whole batches from an equal shard: what does not fit is left out.
        by_shards = plan.n_train - cfg.replicas * (plan.n_train // cfg.replicas)
        line += (f" ({plan.n_train - used} of {plan.n_train} left out each epoch: {by_shards} to make "
                 f"{cfg.replicas} equal shards, {plan.n_train - used - by_shards} in incomplete batches)")
    return line


def data_source(files) -> str:
    """Where the dataset's files were read from: their directory, or the list of files."""
    directories = sorted({str(Path(p).parent) for p in files.paths.values()})
    return directories[0] if len(directories) == 1 else ", ".join(sorted(files.paths.values()))


def check_devices(cfg: TrainConfig) -> None:
    """A GPU that is not there fails now, not after the workers have started."""
    from libe_cnn.runtime import check_device

    check_device("--gen-device", cfg.gen_device)
    if cfg.comms == "local":  # under MPI the simulators may be on nodes this one cannot see
        check_device("--device", cfg.device)


def oversubscription_warning(cfg: TrainConfig) -> str | None:
    """More simulators than cores on this node: each gets a fraction of a core."""
    from libe_cnn.runtime import available_cores

    cores = available_cores()
    if cfg.comms != "local" or cfg.n_workers <= cores:
        return None
    return (f"{cfg.n_workers} workers on {cores} cores: they take turns on the cores, each holding its own copy "
            f"of the model and data, so beyond -n {cores} more workers cost memory and add little speed")


NO_MPI4PY = f"mpi4py is not installed for {sys.executable}: run make setup-mpi (or pip install 'libe-cnn[mpi]')"


def mpi_world():
    """COMM_WORLD when launched with --comms mpi, else None."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError(f"--comms mpi needs mpi4py: {NO_MPI4PY}") from None

    return MPI.COMM_WORLD


def train(cfg: TrainConfig) -> dict | None:
    """Run one training job end to end; returns its summary on the manager, None elsewhere."""
    comm = mpi_world() if cfg.comms == "mpi" else None
    if comm is not None:
        if comm.Get_size() < 2:
            raise UserError("--comms mpi needs at least 2 ranks: mpiexec -n N+1 for N workers")
        # One rank per simulator plus the manager: the launch decides N.
        if cfg.resume and comm.Get_size() - 1 != cfg.n_workers:
            raise UserError(f"the run being resumed has {cfg.n_workers} workers: launch it with "
                            f"mpiexec -n {cfg.n_workers + 1}")
        cfg = dataclasses.replace(cfg, n_workers=comm.Get_size() - 1)
    is_manager = comm is None or comm.Get_rank() == 0
    # Shared memory serves only processes on one host.
    hosts = len(set(comm.allgather(socket.gethostname()))) if comm is not None else 1
    with ExitStack() as stack:
        plan, error = None, None
        if is_manager:
            try:
                plan = prepare(cfg, stack, hosts)
                open_transport(plan, stack)
            except UserError as e:
                error = e
        if comm is not None:
            # Every rank runs from the manager's plan (its run id, data files and store).
            plan, error = comm.bcast((plan, error), root=0)
        if error is not None:
            raise error
        if comm is not None and plan.config.redis_per_host:
            from libe_cnn.redis_server import start_host_servers

            more, homes = start_host_servers(comm, plan.redis, plan.config.n_workers, stack)
            plan = dataclasses.replace(plan, more_redis=more, server_homes=homes)
        if comm is None:
            # Workers are started fresh, not forked: a fork after torch has started its
            # thread pool deadlocks at the first convolution.
            multiprocessing.set_start_method("spawn", force=True)
        if not is_manager:
            run_ensemble(plan)
            return None
        # libEnsemble writes its log, stats and history to the working directory.
        with chdir(plan.config.run_dir):
            flag = run_ensemble(plan)
    run_dir = Path(plan.config.run_dir)
    summary_path = run_dir / "summary.json"
    if flag != 0 or not summary_path.exists():
        raise RuntimeError(f"the ensemble ended abnormally (flag {flag}); see {run_dir / 'ensemble.log'}")
    return json.loads(summary_path.read_text())


# Variables in which MPI launchers give each process its rank.
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _is_worker_rank() -> bool:
    """True on MPI ranks other than 0, so that only the manager prints errors."""
    return any(os.environ.get(var, "0") != "0" for var in RANK_VARS)


# libEnsemble's wrapping of a worker's error: "Received error message from worker 2:
# package.module.ValueError: what: See error details above and in ensemble.log".
_LIBE_WRAPPER = re.compile(r"^Received error message from worker (\d+): (?:[\w.]+\.)?(\w+: )?(.*?)(?:: See error details.*)?$")


def error_line(error: Exception) -> str:
    """One line for an unexpected failure; its traceback is in ensemble.log."""
    parts = [str(a) for a in error.args if a] or [type(error).__name__]
    text = ": ".join(" ".join(p.split()) for p in parts)
    wrapped = _LIBE_WRAPPER.match(text)
    if wrapped:
        worker, kind, what = wrapped.groups()
        where = "the generator" if worker == "0" else f"worker {worker}"
        kind = kind.rstrip(": ") if kind else ""
        if kind in ("ConnectionError", "TimeoutError"):
            what = f"lost the connection to Redis: {what}"
        return f"{what} (in {where}{', ' + kind if kind else ''})"
    return text


def launch_lines(cfg: TrainConfig, argv: list[str], root: bool = False) -> str:
    """Command lines that run these options with cfg.n_workers workers on two nodes (`root`: as root,
    which Open MPI refuses unless told)."""
    private = cfg.redis_host is None
    port = cfg.redis_port or 6380
    # Options the launch lines set themselves, with how many values follow each.
    owned = {"-n": 1, "--nworkers": 1, "--comms": 1, "--print-launch": 0,
             **({"--redis-bind": 1, "--redis-port": 1} if private else {})}
    options, skip = [], 0
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip -= 1
        elif name in owned:
            skip = 0 if "=" in arg else owned[name]
        else:
            options.append(arg)
    ranks = cfg.n_workers + 1
    redis = f"--redis-bind 0.0.0.0 --redis-port {port}" if private else ""
    # Absolute paths both: the remote node starts in its home directory, not here.
    script = str(Path(__file__).resolve())
    command = " ".join(filter(None, [shlex.quote(sys.executable), shlex.quote(script), "--comms mpi", redis,
                                     *map(shlex.quote, options)]))
    where = (f"a private Redis; TCP port {port} on the first node must be open to the second"
             if private else f"connects to Redis at {cfg.redis_host}:{cfg.redis_port}, which both nodes must reach")
    return "\n".join([
        f"# {cfg.n_workers} workers on two nodes: {ranks} MPI ranks. Rank 0, on the first node, runs the manager,",
        f"# the generator and {where}.",
        "# HOSTS lists both nodes, the first one first. More in multinode/README.md.",
        "",
        # Spread the ranks over both nodes: by default Open MPI fills the first node's
        # slots (its core count) before it uses the second.
        "# Open MPI:" + (" (--allow-run-as-root: it refuses root without it)" if root else ""),
        f"mpiexec -n {ranks} {'--allow-run-as-root ' if root else ''}--hostfile HOSTS --map-by node {command}",
        "",
        "# MPICH:",
        f"mpiexec -n {ranks} -f HOSTS -ppn {-(-ranks // 2)} {command}",
        "",
        "# Slurm, inside an allocation of two nodes (salloc --nodes 2):",
        f"srun --nodes 2 --ntasks {ranks} --mpi=pmix {command}",
    ])


def checkpoint_step(cfg: TrainConfig | None) -> int | None:
    """The step of the run's checkpoint.pt, None when there is none (or none that can be read)."""
    from libe_cnn.checkpoint import CHECKPOINT, load_checkpoint

    if cfg is None or not (Path(cfg.run_dir) / CHECKPOINT).is_file():
        return None
    try:
        return load_checkpoint(Path(cfg.run_dir))["step"]
    except UserError:
        return None


def interrupted_line(cfg: TrainConfig | None) -> str:
    """What a Ctrl-C leaves: the step its checkpoint holds and how to continue, or that there is none."""
    step = checkpoint_step(cfg)
    if step is None:
        return "interrupted before the first checkpoint: nothing to resume"
    if step == 0:
        return f"interrupted before the first step: continue with --resume {cfg.run_dir}"
    return f"interrupted after step {step}: continue with --resume {cfg.run_dir}"


def kept_line(cfg: TrainConfig) -> str:
    """After a file could not be written: the checkpoint that is kept, and how to go on from it."""
    step = checkpoint_step(cfg)
    if step is None:
        return "no checkpoint was written: make room, then start the run again"
    return f"its checkpoint of step {step} is kept: make room, then continue with --resume {cfg.run_dir}"


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the imports are done: Ctrl-C is KeyboardInterrupt
    argv = sys.argv[1:] if argv is None else argv
    cfg = None  # the log's place is known only once the options are
    try:
        cfg = config_from_args(argv)
        if "--print-launch" in argv:
            if importlib.util.find_spec("mpi4py") is None:
                print(f"warning: {NO_MPI4PY}, which these lines need", file=sys.stderr)
            print(launch_lines(cfg, argv, root=os.geteuid() == 0))
            return 0
        summary = train(cfg)
    except UserError as e:
        if not _is_worker_rank():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not _is_worker_rank():
            print(interrupted_line(cfg), file=sys.stderr)
        return 130
    except Exception as e:  # a failure inside the ensemble: one line here, details in the log
        if not _is_worker_rank():
            from libe_cnn.rundir import first_write_failure

            log = Path(cfg.run_dir) / "ensemble.log" if cfg is not None else None
            failure = first_write_failure()
            if failure is not None:  # the cause is plain; what is kept is what matters next
                print(f"error: {failure}; {kept_line(cfg)}", file=sys.stderr)
            else:
                print(f"error: {error_line(e)}" + (f" ({log})" if log and log.exists() else ""), file=sys.stderr)
        return 1
    if summary is None:  # an MPI worker rank: the manager reports
        return 0
    print(done_line(summary, cfg.run_dir))
    return 0


def done_line(summary: dict, run_dir: str) -> str:
    """The run's result in one line, counting as the progress line did."""
    steady = summary.get("steady_samples_per_s")
    strategy = strategies.strategy(summary["strategy"])
    detail = strategy.done_detail(summary)
    took = f"{summary['steps']} {strategy.step_unit}s" + (f" ({detail})" if detail else "")
    return (f"done: {took}, {summary['samples']} samples in {summary['wall_s']:.1f} s "
            f"({summary['samples_per_s']:.0f} samples/s" + (f", {steady:.0f} in steady state" if steady else "")
            + f"); test accuracy {summary['test_accuracy']:.2%}, test loss {summary['test_loss']:.4f}; "
            f"results in {run_dir}")


if __name__ == "__main__":
    sys.exit(main())

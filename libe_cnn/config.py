"""One typed configuration for a run, its fields and their checks (libe_cnn/cli.py fills it from the command line)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from libe_cnn import strategies
from libe_cnn.errors import UserError
from libe_cnn.pipeline.schedule import SCHEDULES

DATASETS = ("mnist", "fashion-mnist", "cifar10", "iris")
# Training defaults that suit each dataset; an option given on the command line wins.
# Iris is 120 training flowers: small batches, a larger step and many epochs, still seconds.
TRAINING_DEFAULTS = {"epochs": 1, "batch_size": 64, "lr": 1e-3}
DATASET_DEFAULTS = {"iris": {"epochs": 50, "batch_size": 8, "lr": 1e-2}}
OPTIMIZERS = ("adam", "adadelta", "sgd")
STRATEGIES = strategies.STRATEGIES
ON_NONFINITE = ("stop", "skip")
COMMS = ("local", "mpi")
WIRE_DTYPES = ("float32", "bfloat16", "float16", "int8")
# How the buffers travel: shared memory when every process is on one host (auto), or Redis.
TRANSPORTS = ("auto", "shm", "redis")
# cnn: the dataset's own network (mnist.model); the ResNets take the image datasets.
MODEL_NAMES = ("cnn", "resnet18", "resnet18-narrow")
PARALLELISMS = ("data", "pipeline")
SPLITS = ("time", "memory")  # balance the stages' measured time, or their parameters
# The pipeline options and their defaults (--parallelism pipeline), by TrainConfig field.
PIPELINE_DEFAULTS = {"stages": 2, "microbatches": 4, "schedule": "1f1b", "split": "time"}


def dataset_default(name: str) -> str:
    """A training option's default as help text: `64; iris: 8`."""
    special = [f"{dataset}: {d[name]}" for dataset, d in DATASET_DEFAULTS.items() if name in d]
    return "; ".join([str(TRAINING_DEFAULTS[name]), *special])


def fill_training_defaults(options) -> None:
    """Set the training options left unset (None) on `options` to its dataset's defaults."""
    for name, value in {**TRAINING_DEFAULTS, **DATASET_DEFAULTS.get(options.dataset, {})}.items():
        if getattr(options, name) is None:
            setattr(options, name, value)


@dataclass
class TrainConfig:
    # --- ensemble ---
    n_workers: int = 2  # simulators, each training on its own shard
    comms: str = "local"  # libEnsemble comms: local processes or MPI ranks
    # --- data ---
    dataset: str = "mnist"
    # torchvision raw layout: <data_dir>/<Name>/raw/*-ubyte[.gz]; None: ./data, then the
    # system's copy (mnist.data.locate); a directory given is the only place looked in.
    data_dir: str | None = None
    limit_train: int | None = None  # use only the first K training samples
    limit_test: int | None = None  # evaluate on the first K test samples only
    # --- training ---
    epochs: int | None = None  # default: by dataset (TRAINING_DEFAULTS, DATASET_DEFAULTS)
    max_steps: int | None = None  # stop after this many optimizer steps
    batch_size: int | None = None  # per worker and step; the global batch is n_workers * batch_size
    lr: float | None = None
    optimizer: str = "adam"
    # --- model and parallelism ---
    model: str = "cnn"
    parallelism: str = "data"  # data: a whole model per worker; pipeline: consecutive layers per worker
    # --parallelism pipeline only (None otherwise; PIPELINE_DEFAULTS fill them):
    stages: int | None = None  # K: each replica is a pipeline of K workers (N/K replicas)
    microbatches: int | None = None  # M: each batch goes through the pipeline in M micro-batches
    schedule: str | None = None  # the order of each stage's forwards and backwards
    split: str | None = None  # time, memory, or the first layer of stages 2..K ("4,9")
    # --- aggregation strategy: each one's options, defaults, checks and math in libe_cnn/strategies ---
    strategy: str = strategies.DEFAULT
    # The strategies' own options; None: not given (the chosen strategy's defaults fill its own).
    reduce: str | None = None
    bucket_mb: float | None = None
    reduce_topology: str | None = None  # its default depends on N, resolved where it is used
    sync_period: int | None = None
    mix_lambda: float | None = None
    outer_lr: float | None = None
    outer_momentum: float | None = None
    elastic_alpha: float | None = None  # easgd's default depends on N, resolved where it is used
    max_staleness: int | None = None
    gossip_topology: str | None = None
    agg_prob: float | None = None
    on_nonfinite: str = "stop"  # a NaN/inf result: stop the run, or (where the strategy can) skip it
    wire_dtype: str = "float32"  # element type of gradients and parameters in the store
    eval_every: int | None = None  # also evaluate every this many steps (always at epoch ends); None: 10 per epoch
    eval_subset: int = 2000  # evaluations between epoch ends test on the first this many test samples (0: all)
    checkpoint_every: int | None = None  # also checkpoint every this many steps (always at epoch ends and the end)
    seed: int = 1
    dropout: bool = True  # off only for exact comparisons (parity tests)
    device: str = "auto"  # simulators' device; auto: a GPU per simulator by local rank, else CPU
    gen_device: str = "auto"  # the generator's device; auto: the first GPU of its node, else CPU
    # --- redis ---
    redis_host: str | None = None  # None: start a private server for this run
    redis_port: int | None = None  # --redis-host's port (default 6379); the private server's (default: free)
    redis_bind: str | None = None  # the private server listens here (default 127.0.0.1)
    redis_password: str | None = field(default=None, repr=False)  # never saved nor printed
    redis_user: str | None = None  # an ACL user of --redis-host (None: the server's default user)
    redis_db: int = 0  # the database of --redis-host that holds the run's keys
    redis_tls: bool = False  # reach --redis-host over TLS (REDIS_URL rediss://)
    # redis-py's ssl_* options from REDIS_URL's query, as strings, e.g. {"ssl_ca_certs": "/etc/ca.pem"}
    redis_tls_options: dict[str, str] = field(default_factory=dict)
    redis_servers: int = 1  # private servers to start (one per node, as it were); workers' data is spread over them
    redis_per_host: bool = False  # --comms mpi: a private server on every host, each worker's data on its own host's
    # Where the buffers go: shm (shared memory; every process on one host), redis, or auto (shm where it can)
    transport: str = "auto"
    # --- output ---
    run_dir: str | None = None  # default runs/<timestamp>
    tensorboard: str | None = None  # also write the metrics as TensorBoard events into this directory
    run_id: str = ""  # namespaces this run's store keys; generated when empty
    resume: bool = False  # continue the run in run_dir from its checkpoint

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(self.n_workers >= 1, f"-n must be at least 1 (got {self.n_workers})")
        need(self.comms in COMMS, f"--comms must be one of {', '.join(COMMS)} (got {self.comms!r})")
        need(self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)} (got {self.dataset!r})")
        fill_training_defaults(self)
        need(self.limit_train is None or self.limit_train >= 1, f"--limit-train must be at least 1 (got {self.limit_train})")
        need(self.limit_test is None or self.limit_test >= 1, f"--limit-test must be at least 1 (got {self.limit_test})")
        need(self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1 (got {self.max_steps})")
        need(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive and finite (got {self.lr})")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        need(self.wire_dtype in WIRE_DTYPES,
             f"--wire-dtype must be one of {', '.join(WIRE_DTYPES)} (got {self.wire_dtype!r})")
        need(self.eval_every is None or self.eval_every >= 0, f"--eval-every must be at least 0 (got {self.eval_every})")
        need(self.eval_subset >= 0, f"--eval-subset must be at least 0 (got {self.eval_subset})")
        need(self.tensorboard is None or importlib.util.find_spec("tensorboard") is not None,
             "--tensorboard needs the tensorboard package: pip install 'libe-cnn[tensorboard]'")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})")
        self._check_strategy(need)
        self._check_parallelism(need)
        need(self.redis_port is None or 0 < self.redis_port < 65536,
             f"--redis-port must be 1-65535 (got {self.redis_port})")
        for flag, device in (("--device", self.device), ("--gen-device", self.gen_device)):
            need(device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", device) is not None,
                 f"{flag} must be auto, cpu, cuda or cuda:K (got {device!r})")
        need(self.redis_host is None or self.redis_bind is None,
             "--redis-bind starts a private server and --redis-host names an existing one: give only one")
        need(
            self.comms != "mpi" or self.redis_host is not None or self.redis_bind is not None,
            "--comms mpi needs a Redis every rank can reach: --redis-bind ADDR (a private server on "
            "the first node) or --redis-host HOST",
        )
        need(self.redis_servers >= 1, f"--redis-servers must be at least 1 (got {self.redis_servers})")
        need(self.redis_servers == 1 or self.redis_host is None,
             "--redis-servers starts private servers and --redis-host names one existing server: give only one")
        need(self.redis_servers == 1 or self.redis_port is None,
             "--redis-port fixes the port of one private server: with --redis-servers, leave the ports free")
        need(not self.redis_per_host or (self.comms == "mpi" and self.redis_bind is not None and self.redis_servers == 1),
             "--redis-per-host starts a private server on every host of an MPI launch: it needs --comms mpi and "
             "--redis-bind (the first host's), and no --redis-servers")
        need(self.redis_db >= 0, f"--redis-db must be 0 or more (got {self.redis_db})")
        need(self.transport in TRANSPORTS,
             f"--transport must be one of {', '.join(TRANSPORTS)} (got {self.transport!r})")
        need(self.redis_host is not None or (self.redis_user is None and self.redis_db == 0 and not self.redis_tls),
             "--redis-user, --redis-db and TLS apply to an existing server (--redis-host or REDIS_URL): "
             "a private server has one user, one database and no TLS")
        need(self.redis_tls or not self.redis_tls_options,
             f"{', '.join(self.redis_tls_options)}: TLS options need a TLS connection (REDIS_URL rediss://)")
        if self.redis_host is not None and self.redis_port is None:
            self.redis_port = 6379
        if not self.run_id:
            self.run_id = f"lcnn-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if self.run_dir is None:
            self.run_dir = str(Path("runs") / self.run_id.removeprefix("lcnn-"))
        # Absolute paths: the ensemble runs with the run directory as its working directory.
        self.run_dir = str(Path(self.run_dir).resolve())
        if self.data_dir is not None:
            self.data_dir = str(Path(self.data_dir).resolve())
        if self.tensorboard is not None:
            self.tensorboard = str(Path(self.tensorboard).resolve())

    def _check_strategy(self, need) -> None:
        need(self.strategy in STRATEGIES,
             f"--strategy must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        chosen = strategies.strategy(self.strategy)
        for field_option in strategies.all_options().values():
            value, option = getattr(self, field_option.name), chosen.option(field_option.name)
            if option is None:  # the chosen strategy takes no version of it
                need(value is None, f"{field_option.flag} does not apply to --strategy {self.strategy} "
                                    f"(only to {', '.join(strategies.takers(field_option))})")
                continue
            if value is None:  # defaults that depend on N (easgd's alpha) stay None: N may still change
                value = option.default
                setattr(self, option.name, value)
            if value is not None:
                need(option.choices is None or value in option.choices,
                     f"{option.flag} must be one of {', '.join(option.choices or ())} (got {value!r})")
                problem = option.check(value, self.n_workers) if option.check else None
                need(problem is None, problem)
        need(not chosen.needs_peers or self.n_workers >= 2,
             f"--strategy {self.strategy} exchanges parameters between workers: it needs -n 2 or more "
             f"(got -n {self.n_workers})")
        need(self.on_nonfinite in ON_NONFINITE,
             f"--on-nonfinite must be one of {', '.join(ON_NONFINITE)} (got {self.on_nonfinite!r})")
        need(self.on_nonfinite == "stop" or chosen.skips_nonfinite,
             f"--on-nonfinite skip applies only to {' and '.join(strategies.skipping_nonfinite())} "
             f"(got --strategy {self.strategy}): a worker whose parameters went non-finite cannot be skipped")
        # Error feedback needs what each worker sends and the parameters' changes to go through the
        # generator whole: sync's star, diloco's rounds, on whole models.
        need(self.wire_dtype != "int8" or (chosen.int8_wire and self.reduce_topology in (None, "star")
                                           and self.parallelism == "data"),
             f"--wire-dtype int8 applies to {' and '.join(strategies.int8_strategies())} (sync with --reduce-topology "
             f"star), with --parallelism data (got --strategy {self.strategy}, --reduce-topology "
             f"{self.reduce_topology or 'its default'}, --parallelism {self.parallelism})")

    def _check_parallelism(self, need) -> None:
        need(self.model in MODEL_NAMES, f"--model must be one of {', '.join(MODEL_NAMES)} (got {self.model!r})")
        need(self.model == "cnn" or self.dataset != "iris",
             f"--model {self.model} takes images: use it with mnist, fashion-mnist or cifar10 (got --dataset iris)")
        need(self.parallelism in PARALLELISMS,
             f"--parallelism must be one of {', '.join(PARALLELISMS)} (got {self.parallelism!r})")
        if self.parallelism == "data":
            for name in PIPELINE_DEFAULTS:
                need(getattr(self, name) is None, f"--{name} applies only to --parallelism pipeline")
            return
        for name, default in PIPELINE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        takers = [name for name, s in strategies.REGISTRY.items() if s.combines_pipelines]
        need(strategies.strategy(self.strategy).combines_pipelines,
             f"--parallelism pipeline combines its replicas' gradients as {' and '.join(takers)} does: "
             f"--strategy {self.strategy} does not apply")
        need(self.reduce_topology in (None, "star"), "--parallelism pipeline reduces at the generator "
                                                     "(--reduce-topology star)")
        k, m = self.stages, self.microbatches
        need(k >= 2, f"--stages must be at least 2 (got {k}); one stage is --parallelism data")
        need(self.n_workers % k == 0, f"-n {self.n_workers} is not a multiple of --stages {k}: "
                                      "the run has N/K replicas of a K-stage pipeline")
        need(m >= 1, f"--microbatches must be at least 1 (got {m})")
        need(m <= self.batch_size, f"--microbatches {m} is more than --batch-size {self.batch_size}: "
                                   "every micro-batch needs a sample")
        need(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        need(self.split in SPLITS or re.fullmatch(r"\d+(,\d+)*", self.split) is not None,
             f"--split must be time, memory or the first layer of each stage after the first, as in 4,9 "
             f"(got {self.split!r})")

    @property
    def replicas(self) -> int:
        """Workers that each hold a whole model (data parallelism) or pipelines of --stages workers:
        the data is cut into this many shards."""
        return self.n_workers // self.stages if self.parallelism == "pipeline" else self.n_workers

    def public_dict(self) -> dict:
        """The configuration as saved and printed: everything but the password."""
        d = dataclasses.asdict(self)
        d["redis_password"] = "***" if self.redis_password else None
        return d

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.public_dict(), indent=2) + "\n")

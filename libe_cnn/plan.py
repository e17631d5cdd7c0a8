"""What every process of a run needs to know besides the config: data, sizes, schedule, store."""

from __future__ import annotations

from dataclasses import dataclass

from libe_cnn.config import TrainConfig
from libe_cnn.errors import UserError
from libe_cnn.store import RedisAddress, consecutive_homes
from libe_cnn.strategies import Strategy, strategy

# libEnsemble rows carry store keys and small numbers only, never tensors: the manager keeps
# every row in its history, and a row holding a tensor would keep that tensor alive.
KEY_DTYPE = "U96"
GEN_OUT = [
    ("params_key", KEY_DTYPE),  # parameters to load (or a center to pull toward); empty: none
    ("peers_key", KEY_DTYPE),  # who exchanges with whom this round; empty: none
    # What the row's parameters are: the parent's version (gradient strategies), or the step
    # the round starts at (local steps); a result carries it back.
    ("version", int),
    ("n_steps", int),  # local steps to take before answering
    ("checkpoint", bool),  # also send your own state (parameters, optimizer) for a checkpoint
]
SIM_OUT = [
    ("result_key", KEY_DTYPE),  # the worker's gradient, or its parameters after local steps
    ("state_key", KEY_DTYPE),  # when asked for a checkpoint: its parameters and optimizer state
    ("version", int),  # the `version` of the row this result answers
    ("loss", float),
    ("n_samples", int),
    ("shard", int),
    # Where a simulator's step time goes, in seconds:
    ("load_s", float),  # fetch the parameters and copy them into the model (streamed: forward waiting for them)
    ("compute_s", float),  # forward + backward
    ("put_s", float),  # put the gradient (streamed: waiting for its last buckets to be put)
    ("wait_s", float),  # blocked until the generator's next row arrived
    ("exchange_s", float),  # streamed (sync): store traffic in the worker's background threads
    ("peer_wait_s", float),  # pipeline: blocked on the neighbouring stages (the bubble, and any imbalance)
    ("nonfinite_from", KEY_DTYPE),  # ring-allreduce: the workers whose gradient was NaN or inf ("2,3")
    ("rss_mb", float),  # the simulator's resident memory
]


def resume_key(shard: int) -> str:
    """Where a resumed run leaves a worker's own state (parameters, optimizer) for it to load."""
    return f"resume-{shard}"


@dataclass(frozen=True)
class DatasetFiles:
    """Where a dataset's files are (mnist.data.locate finds them)."""

    name: str
    paths: dict[str, str]  # file role (train_images, csv...) -> path of the file


def steps_per_epoch(n_train: int, n_shards: int, batch_size: int) -> int:
    """Optimizer steps per epoch: every shard gives full batches."""
    return (n_train // n_shards) // batch_size


EVALS_PER_EPOCH = 10  # by default


@dataclass(frozen=True)
class RunPlan:
    config: TrainConfig
    files: DatasetFiles
    redis: RedisAddress | None  # set once the manager has connected
    n_train: int  # training samples used (after --limit-train)
    steps_per_epoch: int
    total_steps: int
    # Resuming: each worker's next batch (from the checkpoint); None for a fresh start.
    resume_positions: tuple[int, ...] | None = None
    # Store servers besides `redis` (--redis-servers): workers' data is spread over all of them;
    # queues, heartbeats and the generator's own keys stay on `redis`.
    more_redis: tuple[RedisAddress, ...] = ()
    # Each worker's server, an index into `servers`: the server of its host (--redis-per-host),
    # or None: consecutive workers share one (store.consecutive_homes).
    server_homes: tuple[int, ...] | None = None
    # The run's shared-memory directory when its buffers travel there (--transport), else None: Redis.
    shm_dir: str | None = None

    @property
    def servers(self) -> tuple[RedisAddress, ...]:
        return (self.redis, *self.more_redis)

    @property
    def homes(self) -> tuple[int, ...]:
        """The server each worker writes to."""
        return self.server_homes or consecutive_homes(self.config.n_workers, len(self.servers))

    @property
    def strategy(self) -> Strategy:
        if self.config.parallelism == "pipeline":
            from libe_cnn.strategies.pipeline import STRATEGY as PIPELINE  # sync, stage by stage

            return PIPELINE
        return strategy(self.config.strategy)

    @property
    def recorded_steps(self) -> int:
        """The run's length in the steps its metrics and checkpoints count (some strategies
        count single gradients, N per step of the others)."""
        return self.strategy.recorded_steps(self.total_steps, self.config.n_workers)

    @property
    def step_unit(self) -> str:
        """What one recorded step is: one batch on every worker, or one gradient."""
        return self.strategy.step_unit

    def due(self, step: int, every: int | None) -> bool:
        """Whether `step` (of one batch on every worker) ends an epoch, is a multiple of `every`, or is the last."""
        return step % self.steps_per_epoch == 0 or step == self.total_steps or bool(every and step % every == 0)

    def checkpoint_at(self, step: int) -> bool:
        """Whether the run writes a checkpoint after `step` (at epoch ends, every --checkpoint-every, the end)."""
        return self.due(step, self.config.checkpoint_every)

    @property
    def eval_every(self) -> int:
        """Steps between the evaluations besides those at epoch ends (0: none): --eval-every,
        else a tenth of an epoch, so that a one-epoch run's curves have ten points (none where
        evaluating would change the math: Strategy.rounds_end_at_evaluations)."""
        cfg = self.config
        if cfg.eval_every is not None:
            return cfg.eval_every
        return 0 if self.strategy.rounds_end_at_evaluations else self.steps_per_epoch // EVALS_PER_EPOCH

    @property
    def samples_per_epoch(self) -> int:
        """Samples trained on per epoch: whole batches from equal shards."""
        return self.steps_per_epoch * self.config.batch_size * self.config.replicas


def make_plan(cfg: TrainConfig, files: DatasetFiles, n_available: int) -> RunPlan:
    """Fix the schedule for a dataset of `n_available` training samples (checked beforehand:
    mnist.data.check_dataset); the store's address is filled in once connected."""
    n_train = min(n_available, cfg.limit_train) if cfg.limit_train else n_available
    per_epoch = steps_per_epoch(n_train, cfg.replicas, cfg.batch_size)
    if per_epoch < 1:
        holders = f"{cfg.n_workers} workers" if cfg.replicas == cfg.n_workers else f"{cfg.replicas} pipelines"
        raise UserError(
            f"each of {holders} gets {n_train // cfg.replicas} samples, fewer than "
            f"--batch-size {cfg.batch_size}: lower -n or --batch-size, or raise --limit-train"
        )
    total = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return RunPlan(cfg, files, None, n_train, per_epoch, total)


def plan_from_user(user: dict) -> RunPlan:
    """The plan as handed to a generator or simulator.

    libEnsemble dumps its specs to plain dicts (dataclasses included) before they reach the
    workers, so the plan is rebuilt here from whichever form arrives.
    """
    plan = user["plan"]
    if isinstance(plan, RunPlan):
        return plan
    return RunPlan(
        config=TrainConfig(**plan["config"]),
        files=DatasetFiles(**plan["files"]),
        redis=RedisAddress(**plan["redis"]),
        n_train=plan["n_train"],
        steps_per_epoch=plan["steps_per_epoch"],
        total_steps=plan["total_steps"],
        resume_positions=plan["resume_positions"] and tuple(plan["resume_positions"]),
        more_redis=tuple(RedisAddress(**a) for a in plan["more_redis"]),
        server_homes=plan["server_homes"] and tuple(plan["server_homes"]),
        shm_dir=plan["shm_dir"],
    )

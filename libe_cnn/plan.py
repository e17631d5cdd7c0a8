"""What every process of a run needs to know besides the config: data, sizes, schedule, store."""

from __future__ import annotations

from dataclasses import dataclass

from libe_cnn.config import TrainConfig
from libe_cnn.errors import UserError
from libe_cnn.store import RedisAddress
from mnist.data import DatasetFiles, read_split, steps_per_epoch

# libEnsemble rows carry store keys and small numbers only, never tensors: the manager keeps
# every row in its history, and a row holding a tensor would keep that tensor alive.
KEY_DTYPE = "U96"
GEN_OUT = [
    ("params_key", KEY_DTYPE),  # parameters to load (or, for easgd, the center); empty: none
    ("peers_key", KEY_DTYPE),  # gossip: the round's pairing; empty: none
    ("step", int),  # parameter version (sync, async) or local steps done so far (the others)
    ("n_steps", int),  # local steps to take before answering
    ("checkpoint", bool),  # periodic strategies: also send your own state for a checkpoint
]
SIM_OUT = [
    ("result_key", KEY_DTYPE),  # the worker's gradient (sync, async) or its parameters (the others)
    ("state_key", KEY_DTYPE),  # when asked for a checkpoint: its parameters and optimizer state
    ("version", int),  # the `step` of the row this result answers
    ("loss", float),
    ("n_samples", int),
    ("shard", int),
    # Where a simulator's step time goes, in seconds:
    ("load_s", float),  # fetch the parameters and copy them into the model
    ("compute_s", float),  # forward + backward
    ("put_s", float),  # put the gradient
    ("wait_s", float),  # blocked until the previous step's parameters arrived
    ("rss_mb", float),  # the simulator's resident memory
]


def gossip_key(step: int, shard: int) -> str:
    """Where a gossiping worker leaves its parameters after `step` local steps for its peer."""
    return f"gossip-{step}-{shard}"


def resume_key(shard: int) -> str:
    """Where a resumed run leaves a worker's own state (periodic strategies) for it to load."""
    return f"resume-{shard}"


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

    @property
    def recorded_steps(self) -> int:
        """The run's length in the steps its metrics and checkpoints count: async counts
        single gradients, N per step of the others."""
        return self.total_steps * (self.config.n_workers if self.config.strategy == "async" else 1)

    @property
    def step_unit(self) -> str:
        """What one recorded step is: one gradient (async) or one batch on every worker."""
        return "gradient" if self.config.strategy == "async" else "step"

    @property
    def samples_per_epoch(self) -> int:
        """Samples trained on per epoch: whole batches from equal shards."""
        return self.steps_per_epoch * self.config.batch_size * self.config.n_workers


def check_dataset(files: DatasetFiles) -> int:
    """Read every file once, so a corrupt or truncated one fails here and not in a worker.

    Returns the number of training samples.
    """
    read_split(files, train=False)
    return len(read_split(files, train=True)[1])


def make_plan(cfg: TrainConfig, files: DatasetFiles) -> RunPlan:
    """Check the data and fix the schedule; the store's address is filled in once connected."""
    n_available = check_dataset(files)
    n_train = min(n_available, cfg.limit_train) if cfg.limit_train else n_available
    per_epoch = steps_per_epoch(n_train, cfg.n_workers, cfg.batch_size)
    if per_epoch < 1:
        raise UserError(
            f"each of {cfg.n_workers} workers gets {n_train // cfg.n_workers} samples, fewer than "
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
    )

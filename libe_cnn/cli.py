"""The command line: its options, REDIS_URL, and --resume, into one checked TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from libe_cnn import strategies
from libe_cnn.config import (
    COMMS,
    DATASETS,
    MODEL_NAMES,
    PARALLELISMS,
    PIPELINE_DEFAULTS,
    SCHEDULES,
    ON_NONFINITE,
    OPTIMIZERS,
    STRATEGIES,
    TRANSPORTS,
    WIRE_DTYPES,
    TrainConfig,
    dataset_default,
)
from libe_cnn.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of the tool."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="run_libe_cnn.py",
        description="Data-parallel CNN training as a libEnsemble ensemble: "
        "a parent-model generator and N streaming simulators.",
    )
    d = TrainConfig.__dataclass_fields__

    g = p.add_argument_group("ensemble")
    g.add_argument("-n", "--nworkers", dest="n_workers", type=int, default=d["n_workers"].default,
                   help="number of simulators (data-parallel workers) (default: %(default)s)")
    g.add_argument("--comms", choices=COMMS, default=d["comms"].default,
                   help="libEnsemble comms; with mpi, launch with mpiexec -n N+1 (default: %(default)s)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d["dataset"].default, help="(default: %(default)s)")
    g.add_argument("--data-dir", default=None,
                   help="dataset root, torchvision layout; only this directory is searched "
                        "(default: ./data, then the system's copy)")
    g.add_argument("--limit-train", type=int, default=None, metavar="K",
                   help="train on the first K training samples only")
    g.add_argument("--limit-test", type=int, default=None, metavar="K",
                   help="evaluate on the first K test samples only (quicker evaluations)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help=f"(default: {dataset_default('epochs')})")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (async, which counts single gradients: N times as many)")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per worker per step (default: {dataset_default('batch_size')})")
    g.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {dataset_default('lr')})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"].default, help="(default: %(default)s)")
    g.add_argument("--wire-dtype", choices=WIRE_DTYPES, default=d["wire_dtype"].default,
                   help="type of gradients and parameters on the wire; 16-bit halves the bytes, int8 (sync) "
                        "quarters them, its rounding carried into the next step (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=None, metavar="K",
                   help="also evaluate the parent model every K steps, 0 for never (always at each epoch end and "
                        "the last step; default: ten times per epoch, and never for the strategies with rounds, which an "
                        "evaluation would cut short)")
    g.add_argument("--eval-subset", type=int, default=d["eval_subset"].default, metavar="K",
                   help="those evaluations test on the first K test samples, 0 for all; the ones at epoch ends and "
                        "the last step on all (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d["seed"].default, help="(default: %(default)s)")
    g.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="disable dropout (for exact comparisons)")
    g.add_argument("--device", default=d["device"].default,
                   help="simulators: auto (GPU = local rank %% GPUs on the node, else CPU), cpu, cuda or cuda:K "
                        "(default: %(default)s)")
    g.add_argument("--gen-device", default=d["gen_device"].default,
                   help="the generator: auto (the node's first GPU, else CPU), cpu, cuda or cuda:K (default: %(default)s)")

    g = p.add_argument_group("model and parallelism (see README: Model parallelism)")
    g.add_argument("--model", choices=MODEL_NAMES, default=d["model"].default,
                   help="cnn: the dataset's own network; resnet18: ResNet-18 for small images; resnet18-narrow: "
                        "the same at a quarter of the width (default: %(default)s)")
    g.add_argument("--parallelism", choices=PARALLELISMS, default=d["parallelism"].default,
                   help="data: every worker a whole model; pipeline: consecutive layers on consecutive workers "
                        "(default: %(default)s)")
    g.add_argument("--stages", type=int, default=None, metavar="K",
                   help=f"pipeline: stages per replica; -n N runs N/K replicas (default: {PIPELINE_DEFAULTS['stages']})")
    g.add_argument("--microbatches", type=int, default=None, metavar="M",
                   help=f"pipeline: micro-batches per batch (default: {PIPELINE_DEFAULTS['microbatches']})")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help=f"pipeline: the stages' order of forwards and backwards (default: {PIPELINE_DEFAULTS['schedule']})")
    g.add_argument("--split", default=None,
                   help="pipeline: where the stages are cut: time or memory (balance the stages' measured time or "
                        "parameters), or the first layer of each stage after the first, e.g. 4,9 "
                        f"(default: {PIPELINE_DEFAULTS['split']})")

    g = p.add_argument_group("aggregation strategy (see README: Strategies)")
    g.add_argument("--strategy", choices=STRATEGIES, default=d["strategy"].default,
                   help="how workers combine their work (default: %(default)s)")
    for option in strategies.all_options().values():
        g.add_argument(option.flag, dest=option.name, type=option.type, choices=option.choices, default=None,
                       metavar=option.metavar, help=strategies.option_help(option))
    g.add_argument("--on-nonfinite", choices=ON_NONFINITE, default=d["on_nonfinite"].default,
                   help="a gradient or model with NaN/inf: stop, keeping the last good parent, or "
                        f"({', '.join(strategies.skipping_nonfinite())}) skip that worker's contribution and count it "
                        "(default: %(default)s)")

    g = p.add_argument_group("redis (default: a private server started for the run)")
    g.add_argument("--redis-host", default=None,
                   help="use this Redis server instead (also: REDIS_URL=redis[s]://[USER:PASSWORD@]HOST[:PORT][/DB]"
                        "[?ssl_ca_certs=FILE...], rediss for TLS)")
    g.add_argument("--redis-port", type=int, default=None,
                   help="port of --redis-host (default: 6379) or of the private server (default: a free one)")
    g.add_argument("--redis-bind", default=None, metavar="ADDR",
                   help="start the private server listening on ADDR, e.g. 0.0.0.0 for other nodes "
                        "(default: 127.0.0.1); it always requires a password")
    g.add_argument("--redis-user", default=None,
                   help="ACL user of --redis-host (default: the server's default user)")
    g.add_argument("--redis-password", default=None,
                   help="password of --redis-host (prefer REDIS_URL or REDISCLI_AUTH: arguments are visible)")
    g.add_argument("--redis-db", type=int, default=d["redis_db"].default, metavar="N",
                   help="database of --redis-host for the run's keys (default: %(default)s)")
    g.add_argument("--redis-servers", type=int, default=d["redis_servers"].default, metavar="K",
                   help="start K private servers and spread the workers' traffic over them, consecutive workers "
                        "sharing one as the workers of a node would (default: %(default)s)")
    g.add_argument("--redis-per-host", action="store_true",
                   help="--comms mpi: start a private server on every host of the launch (the first host's at "
                        "--redis-bind), each worker's traffic on its own host's")

    g.add_argument("--transport", choices=TRANSPORTS, default=d["transport"].default,
                   help="how gradients, parameters and states travel: shm (shared memory, every process on one "
                        "host), redis, or auto (shm where every process is on one host and /dev/shm has room, else "
                        "redis); tokens and heartbeats always go through Redis (default: %(default)s)")

    g = p.add_argument_group("output")
    g.add_argument("--run-dir", default=None, help="where to write the run (default: runs/<timestamp>)")
    g.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write the metrics as TensorBoard events into DIR (make setup installs what it needs; "
                        "elsewhere: pip install 'libe-cnn[tensorboard]')")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                   help="also write checkpoint.pt every K steps (always at each epoch end and at the end)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a stopped run from its checkpoint, in place; only the options "
                        f"{', '.join(RESUME_OPTIONS)} may change")
    g.add_argument("--print-launch", action="store_true",
                   help="print the command lines that run these options on two nodes, and exit")
    return p


URL_SHAPE = "redis://[USER:PASSWORD@]HOST[:PORT][/DB], or rediss://... for TLS"
# Options of REDIS_URL that name files: made absolute, as the run works in its run directory.
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


def parse_redis_url(url: str) -> dict:
    """The TrainConfig fields of a Redis URL, read by redis-py's own parser.

    Its query may hold redis-py's TLS options (rediss://HOST?ssl_ca_certs=ca.pem); the others
    (timeouts, protocol, decoding) would change how the run talks to the store: the run sets those.
    """
    import redis
    from redis.connection import parse_url

    from libe_cnn.store import RedisAddress

    try:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"it must look like {URL_SHAPE} (got scheme {parts.scheme!r})")
        parsed = parse_url(url)
        if "host" not in parsed:
            raise ValueError(f"it names no host: it must look like {URL_SHAPE}")
        if parts.path.strip("/") and "db" not in parsed:  # redis-py would take database 0
            raise ValueError(f"its database must be a number, as in redis://HOST:6379/0 (got {parts.path!r})")
        options = {name: values[0] for name, values in parse_qs(parts.query).items()
                   if name not in ("db", "username", "password")}
        for name in options:
            if name == "ssl_password":
                raise ValueError("ssl_password would be saved with the run: use a client key without a passphrase")
            if not name.startswith("ssl_"):
                raise ValueError(f"the run takes no option {name!r}, only db and redis-py's ssl_* options "
                                 "(it sets its own timeouts and protocol)")
        options.update({name: str(Path(options[name]).expanduser().resolve()) for name in TLS_FILES if name in options})
        # An option redis-py's TLS connection does not take, or a bad value, fails now rather than in a worker.
        redis.SSLConnection(**RedisAddress("", 0, tls=True, tls_options=options).typed_tls_options())
    except (ValueError, TypeError, redis.RedisError) as e:
        raise UserError(f"REDIS_URL: {e}") from None
    return {"redis_host": parsed["host"], "redis_port": parsed.get("port", 6379), "redis_user": parsed.get("username"),
            "redis_password": parsed.get("password"), "redis_db": parsed.get("db", 0),
            "redis_tls": parts.scheme == "rediss", "redis_tls_options": options}


# What may differ when a run is resumed: how long it trains, how often it reports, and
# where it runs. Everything else would make the resumed run a different experiment.
RESUME_OPTIONS = ("--epochs", "--max-steps", "--eval-every", "--eval-subset", "--limit-test", "--tensorboard",
                  "--checkpoint-every", "--on-nonfinite", "--bucket-mb", "--reduce-topology", "--device", "--gen-device", "--comms", "--redis-host",
                  "--redis-port", "--redis-bind", "--redis-user", "--redis-password", "--redis-db", "--redis-servers",
                  "--redis-per-host", "--transport")


# Fields added after the first release, with the value that gives a run saved before them the
# math it had (none of them changes it).
ADDED_FIELDS = {"bucket_mb": None, "reduce_topology": None, "redis_servers": 1, "agg_prob": None, "model": "cnn",
                "parallelism": "data", "stages": None, "microbatches": None, "schedule": None, "split": None,
                "eval_subset": 2000, "tensorboard": None, "redis_user": None, "redis_db": 0, "redis_tls": False,
                "redis_tls_options": {}, "outer_lr": None, "outer_momentum": None,
                "redis_per_host": False, "transport": "auto"}


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line (and REDIS_URL) into a checked TrainConfig."""
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    del values["print_launch"]  # an action, not part of a run's configuration
    resume = values.pop("resume")
    given = given_options(parser, argv)
    if resume is not None:
        values = resumed_values(resume, given)
    url = os.environ.get("REDIS_URL")
    # REDIS_URL names the server unless the command line does; it also moves a resumed run from
    # its saved server (whose password was never saved), but not from a private one bound for other nodes.
    if url and "redis_host" not in given and values["redis_bind"] is None:
        values.update({name: value for name, value in parse_redis_url(url).items() if name not in given})
    if values["redis_password"] is None and values["redis_host"] is not None:
        values["redis_password"] = os.environ.get("REDISCLI_AUTH")
    return TrainConfig(**values)


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """Only the options present on the command line, by destination, with their values."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def resumed_values(run_dir: str, given: dict) -> dict:
    """The saved configuration of the run in `run_dir`, with the options that may change."""
    saved_path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise UserError(f"cannot resume {run_dir}: no such directory")
    if not saved_path.is_file():
        raise UserError(f"cannot resume {run_dir}: it has no config.json (is it a run directory?)")
    try:
        values = json.loads(saved_path.read_text())
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        # The tool saves every field: one missing or unknown means someone else's file, except
        # fields added since a run may have been saved, which take their defaults.
        for name in ADDED_FIELDS.keys() - values.keys():
            values[name] = ADDED_FIELDS[name]
        if set(values) != known:
            odd = sorted(known ^ set(values))
            raise ValueError(f"fields missing or unknown: {', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}")
    except ValueError as e:
        raise UserError(f"cannot resume {run_dir}: {saved_path} is not a configuration this tool wrote ({e})") from None
    allowed = {option.removeprefix("--").replace("-", "_") for option in RESUME_OPTIONS}
    if "run_dir" in given and Path(given.pop("run_dir")).resolve() != Path(run_dir).resolve():
        raise UserError("--run-dir and --resume name different directories: give only --resume RUN_DIR")
    for dest, value in given.items():
        if dest in ("resume", "print_launch"):
            continue
        if dest not in allowed and value != values.get(dest):
            flag = "-n" if dest == "n_workers" else "--" + dest.replace("_", "-")
            raise UserError(f"{flag} cannot change when resuming (the run has {values.get(dest)}); "
                            f"only {', '.join(RESUME_OPTIONS)} can: start a new run to change it")
        values[dest] = value
    if "redis_host" in given or "redis_bind" in given:  # a new choice of server replaces the saved one
        for name in ("redis_host", "redis_bind", "redis_port", "redis_user"):
            values[name] = given.get(name)
        values.update(redis_db=given.get("redis_db", 0), redis_tls=False, redis_tls_options={})
    # The password was never saved; the run id names a new session in the store.
    values.update(redis_password=given.get("redis_password"), run_id="", run_dir=run_dir, resume=True)
    return values

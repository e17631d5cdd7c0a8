"""Train the network in one process: the baseline the ensemble is measured against.

    python mnist/nn.py --dataset fashion-mnist --epochs 1
    python mnist/nn.py --dry-run
    python mnist/nn.py --dry-run --dataset fashion-mnist --model resnet18-narrow
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libe_cnn.config import DATASETS, MODEL_NAMES, OPTIMIZERS, TrainConfig, dataset_default, fill_training_defaults
from libe_cnn.errors import UserError
from libe_cnn.runtime import available_cores, set_threads
from mnist.data import BatchOrder, load_split, locate
from mnist.model import build_model, evaluate, make_optimizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the network in a single process.")
    d = TrainConfig.__dataclass_fields__  # the same defaults as the ensemble's
    p.add_argument("--dataset", choices=DATASETS, default=d["dataset"].default, help="(default: %(default)s)")
    p.add_argument("--model", choices=MODEL_NAMES, default=d["model"].default,
                   help="cnn: the dataset's own network; resnet18: ResNet-18 for small images; resnet18-narrow: "
                        "the same at a quarter of the width (default: %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="dataset root, torchvision layout; only this directory is searched "
                        "(default: ./data, then the system's copy)")
    p.add_argument("--limit-train", type=int, default=None, metavar="K", help="train on the first K samples only")
    p.add_argument("--limit-test", type=int, default=None, metavar="K", help="evaluate on the first K test samples only")
    p.add_argument("--epochs", type=int, default=None, help=f"(default: {dataset_default('epochs')})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per step (default: {dataset_default('batch_size')})")
    p.add_argument("--lr", type=float, default=None, help=f"(default: {dataset_default('lr')})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"].default, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="one step on a few samples, to check the setup")
    p.add_argument("--save-model", default=None, metavar="PATH", help="write the trained state_dict here")
    p.add_argument("--summary-json", default=None, metavar="PATH", help="write the run's summary here")
    return p


def train(args: argparse.Namespace) -> dict:
    fill_training_defaults(args)
    for name in ("epochs", "batch_size", "threads", "limit_train", "limit_test", "max_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive (got {args.lr})")
    if args.model != "cnn" and args.dataset == "iris":
        raise UserError(f"--model {args.model} takes images: use it with mnist, fashion-mnist or cifar10 "
                        "(got --dataset iris)")
    set_threads(args.threads or available_cores())
    device = torch.device(args.device)
    files = locate(args.dataset, args.data_dir)
    limit = args.batch_size if args.dry_run else args.limit_train
    train_x, train_y = load_split(files, train=True, limit=limit)
    test_x, test_y = load_split(files, train=False, limit=1000 if args.dry_run else args.limit_test)
    train_x, train_y = train_x.to(device), train_y.to(device)
    if len(train_y) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(train_y)} training samples")

    model = build_model(args.seed, dataset=args.dataset, model=args.model).to(device).train()
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    per_epoch = len(train_y) // args.batch_size
    total = per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, per_epoch * args.epochs)
    if args.dry_run:
        total = 1
    torch.manual_seed(args.seed)
    batches = BatchOrder(len(train_y), args.seed, 0, per_epoch, args.batch_size)  # one worker's shard 0
    samples, train_time, step = 0, 0.0, 0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        for _ in range(per_epoch):
            if step == total:
                break
            idx = torch.from_numpy(batches.positions(step)).to(device)
            optimizer.zero_grad()
            loss = F.nll_loss(model(train_x[idx]), train_y[idx])
            loss.backward()
            optimizer.step()
            samples += len(idx)
            step += 1
            if step % 100 == 0:
                print(f"epoch {epoch + 1} step {step}/{total} loss {loss.item():.4f}", file=sys.stderr)
        train_time += time.perf_counter() - t0
        test_loss, test_acc = evaluate(model, test_x, test_y)
        print(f"epoch {epoch + 1}: test loss {test_loss:.4f}, test accuracy {test_acc:.2%}", file=sys.stderr)
        if step == total:
            break
    summary = {"steps": step, "samples": samples, "train_s": train_time,
               "samples_per_s": samples / train_time if train_time else 0.0,
               "test_loss": test_loss, "test_accuracy": test_acc, "dataset": args.dataset,
               "model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {s['steps']} steps, {s['samples']} samples, {s['samples_per_s']:.0f} samples/s; "
          f"test accuracy {s['test_accuracy']:.2%}, test loss {s['test_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

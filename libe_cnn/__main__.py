"""The `libe-cnn` command (also `python -m libe_cnn`): training, and tools for data and runs.

    libe-cnn train -n 4 --dataset fashion-mnist     the options of `python run_libe_cnn.py`
    libe-cnn plot RUN_DIR [RUN_DIR ...] [-o OUT.png]
    libe-cnn fetch fashion-mnist [--data-dir DIR]   find a dataset, or download it, before a run

This module stands above every package, as run_libe_cnn.py does: it is the command line, so
it imports the trainer and the datasets (the one exception in tests/unit/test_project.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from libe_cnn.cli import OneLineParser
from libe_cnn.config import DATASETS
from libe_cnn.errors import CannotWrite, UserError


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="libe-cnn", description="Data-parallel CNN training as a libEnsemble ensemble, "
                      "and tools for its data and run directories.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=OneLineParser)
    # Listed for --help only: main() hands everything after `train` to run_libe_cnn.py's own parser.
    commands.add_parser("train", add_help=False,
                        help="train one CNN with N data-parallel workers: the options of "
                        "python run_libe_cnn.py (libe-cnn train --help)")
    plot = commands.add_parser(
        "plot", help="learning curves of one or more runs",
        description="Plot training loss and test accuracy against step and wall time; "
        "several runs overlay, labelled by the settings that differ. "
        "The plotted data is written beside the PNG, with suffix .json.")
    plot.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory")
    plot.add_argument("-o", "--output", type=Path, default=None, metavar="OUT.png",
                      help="the figure; required for several runs (default for one run: RUN_DIR/curves.png). "
                      "Never another run's curves.png, nor a run's config.json or summary.json")
    fetch = commands.add_parser(
        "fetch", help="find a dataset where a run reads it, or download it there",
        description="Look for DATASET where a run would read it (--data-dir; without it ./data, then the "
        "system's copy) and print where its files are. If they are not there, download them into that "
        "directory (./data by default), e.g. on a login node before a job whose nodes have no internet.")
    fetch.add_argument("dataset", choices=DATASETS, metavar="DATASET", help=f"one of {', '.join(DATASETS)}")
    fetch.add_argument("--data-dir", default=None,
                       help="dataset root, torchvision layout; only this directory is searched "
                       "(default: ./data, then the system's copy)")
    fetch.add_argument("--no-download", action="store_true", help="only look; exit 2 if the files are not there")
    return p


def default_output(run_dirs: list[Path]) -> Path:
    """One run: the figure belongs in its directory; several: none of them owns it, so no guess."""
    if len(run_dirs) > 1:
        raise UserError("several runs: name the figure with -o OUT.png (a run's own curves.png is left alone)")
    return run_dirs[0] / "curves.png"


def plot(run_dirs: list[Path], output: Path | None) -> int:
    # Imported here so that --help and argument errors do not wait for matplotlib and torch.
    from libe_cnn.plots import write_curves

    out = output
    try:
        out = out or default_output(run_dirs)
        write_curves(run_dirs, out)
    except (UserError, CannotWrite) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a run's files are not readable
        print(f"error: {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def fetch(dataset: str, data_dir: str | None, download: bool) -> int:
    """Where a run would read `dataset` from, downloading it first if it is missing and allowed."""
    from mnist.data import locate

    try:
        files = locate(dataset, data_dir, download=download)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{dataset}: {', '.join(sorted({str(Path(p).parent) for p in files.paths.values()}))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from run_libe_cnn import main as train

        return train(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "fetch":
        return fetch(args.dataset, args.data_dir, download=not args.no_download)
    return plot(args.run_dirs, args.output)


if __name__ == "__main__":
    sys.exit(main())

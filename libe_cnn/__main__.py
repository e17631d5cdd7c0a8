"""Command line of the package: `python -m libe_cnn plot RUN_DIR [RUN_DIR ...] [-o OUT.png]`."""

from __future__ import annotations

import sys
from pathlib import Path

from libe_cnn.cli import OneLineParser
from libe_cnn.errors import UserError


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m libe_cnn", description="Tools for libe-cnn run directories.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=OneLineParser)
    plot = commands.add_parser(
        "plot", help="learning curves of one or more runs",
        description="Plot training loss and test accuracy against step and wall time; "
        "several runs overlay, labelled by the settings that differ. "
        "The plotted data is written beside the PNG, with suffix .json.")
    plot.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory")
    plot.add_argument("-o", "--output", type=Path, default=None, metavar="OUT.png",
                      help="the figure; required for several runs (default for one run: RUN_DIR/curves.png). "
                      "Never another run's curves.png, nor a run's config.json or summary.json")
    return p


def default_output(run_dirs: list[Path]) -> Path:
    """One run: the figure belongs in its directory; several: none of them owns it, so no guess."""
    if len(run_dirs) > 1:
        raise UserError("several runs: name the figure with -o OUT.png (a run's own curves.png is left alone)")
    return run_dirs[0] / "curves.png"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so that --help and argument errors do not wait for matplotlib and torch.
    from libe_cnn.plots import write_curves

    out = args.output
    try:
        out = out or default_output(args.run_dirs)
        write_curves(args.run_dirs, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a run's files are not readable
        print(f"error: {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m spectral <command> CKPT ...`: the command-line face of the engine (DESIGN.md "Contracts").

Exit codes: 0 success, 2 bad arguments, 3 unreadable or unsafe checkpoint; errors are one line on stderr.
Each subcommand lives in spectral/commands/<name>.py and registers itself with `register(subparsers)`; every one is
imported here, so a missing module fails at once, loudly.
"""
from __future__ import annotations

import argparse
import sys

from spectral.checkpoint import CheckpointError
from spectral.commands import (
    analyze,
    compare,
    deciles,
    nulls,
    overlap,
    prune,
    redundancy,
    report,
    thresholds,
    trajectory,
    truths,
    tying,
    whitened,
)
from spectral.commands.common import UsageError

# in help order
COMMANDS = (analyze, prune, report, compare, trajectory, nulls, truths, tying, thresholds, deciles, overlap,
            redundancy, whitened)

EXIT_BAD_ARGS = 2
EXIT_BAD_CHECKPOINT = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spectral",
                                     description="Random-matrix analysis and what-if pruning of weight matrices.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CHECKPOINT
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

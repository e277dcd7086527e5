"""`python -m spectral trajectory DIR`: every metric of every matrix against training step (the issue's
`trajectory` JSON), from Hugging Face `checkpoint-N` folders, nanoGPT files with `iter_num`, or numbered files."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spectral.analysis import Settings
from spectral.commands.common import StderrProgress, UsageError, probability, write_text
from spectral.compare_figures import trajectory_ranks
from spectral.distributed import DistributedError
from spectral.figures import FigureExportError, figure_to_image
from spectral.noise import ESTIMATORS
from spectral.trajectory import Trajectory, summary_rows, trajectory


def register(sub) -> None:
    p = sub.add_parser("trajectory", help="a training run's checkpoints: every metric against step, signal rank "
                                          "against energy rank over training")
    p.add_argument("folder", metavar="DIR", help="a folder of checkpoint-N folders, nanoGPT ckpt files with iter_num, "
                                                 "or weight files whose names carry the step")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="bema", help="noise σ estimator (default bema)")
    p.add_argument("--confidence", type=probability, default=0.99, help="TW confidence of the edges (default 0.99)")
    p.add_argument("--energy", type=probability, default=0.999, help="energy kept by the energy rank (default 0.999)")
    p.add_argument("--ray", metavar="ADDRESS", help="map the spectra over checkpoint × matrix on this Ray cluster "
                                                    "('local' starts a throwaway one on this machine)")
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    p.add_argument("--table", action="store_true", help="print signal and energy rank per role and step to stdout")
    p.add_argument("--figure", metavar="PATH", help="also draw signal rank against energy rank over training as an "
                                                    "image (.png, .svg or .pdf; needs Chromium for kaleido)")
    p.set_defaults(run=run)


def format_table(result: Trajectory) -> str:
    lines = [(f"| role | step | MP signal SVs / full rank | signal % | energy rank {result.settings.energy:.1%} | "
              "energy % |"), "|---|---|---|---|---|---|"]
    for row in summary_rows(result):
        lines.append(f"| {row['role']} | {row['step']} | {row['n_signal']}/{row['full_rank']} | "
                     f"{row['signal_pct']:.1f}% | {row['energy_rank']}/{row['full_rank']} | {row['energy_pct']:.1f}% |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = Settings(estimator=args.estimator, confidence=args.confidence, energy=args.energy)
    progress = StderrProgress("spectra")
    try:
        result = trajectory(args.folder, settings, ray=args.ray, progress=progress)
    except DistributedError as exc:
        raise UsageError(str(exc)) from None
    finally:
        progress.close()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.figure:
        fmt = Path(args.figure).suffix.lstrip(".").lower() or "png"
        try:
            Path(args.figure).write_bytes(figure_to_image(trajectory_ranks(result), fmt, width=1200, height=560))
        except FigureExportError as exc:
            raise UsageError(str(exc)) from None
    if args.json not in (None, "-"):
        write_text(args.json, result.to_json())
    if args.table or args.json not in (None, "-"):
        print(format_table(result))
    else:
        write_text(None, result.to_json())
    return 0

"""`python -m spectral report CKPT [--html PATH] [--figures DIR]`: the Report page's HTML file and figures.

The same `spectral.report.build_report` the Report page calls: the analysis figures, and, when the model runs, the
compression-against-KL chart of the reference strategies with the chosen cut (`--strategy`, default no cut) and,
with `--scan`, the sensitivity heatmap. Figures are written as PNG and SVG (kaleido and a local Chromium).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spectral.analysis import Settings
from spectral.commands.common import (
    UsageError,
    add_checkpoint_argument,
    add_compute_arguments,
    compute_of,
    probability,
    write_text,
)
from spectral.evaluation import DEFAULT_POSITIONS
from spectral.figures import FigureExportError
from spectral.noise import ESTIMATORS
from spectral.nulls import NULLS
from spectral.pruning import PRECISIONS, SCOPES, STRATEGIES, PlanError, Strategy
from spectral.report import build_report
from spectral.runtime import BatchSpec, ModelRuntime
from spectral.whatif import Choice, WhatIfSession


def register(sub) -> None:
    p = sub.add_parser("report", help="the HTML report and every figure as PNG/SVG")
    add_checkpoint_argument(p)
    add_compute_arguments(p)
    p.add_argument("--html", metavar="PATH", help="write the self-contained HTML report here (default: stdout "
                                                  "unless --figures is given)")
    p.add_argument("--figures", metavar="DIR", help="write every figure as PNG and SVG into this folder")
    p.add_argument("--formats", default="png,svg", help="image formats for --figures (default png,svg)")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="bema", help="noise σ estimator")
    p.add_argument("--confidence", type=probability, default=0.99, help="TW confidence of the edges")
    p.add_argument("--energy", type=probability, default=0.999, help="energy kept by the energy rank")
    p.add_argument("--null", choices=list(NULLS), default="mp", help="what the signal counts refer to (default mp)")
    p.add_argument("--matrix", help="the matrix of the spectrum figures (default: the one with most signal)")
    p.add_argument("--role", help="the role of the small multiples (default: the matrix's role)")
    p.add_argument("--strategy", choices=list(STRATEGIES), default="none", help="the cut marked in the what-if chart")
    p.add_argument("--value", type=float, help="the strategy's threshold")
    p.add_argument("--scope", choices=list(SCOPES), default="all")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--scan", choices=["matrix", "role"], help="add the sensitivity heatmap")
    p.add_argument("--no-whatif", action="store_true", help="analysis figures only (no forward passes)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.confidence >= 1.0:
        raise UsageError(f"--confidence must be below 1, got {args.confidence}")
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    try:
        Strategy(args.strategy, args.value, args.precision)
    except PlanError as e:
        raise UsageError(str(e)) from None
    settings = Settings(estimator=args.estimator, confidence=args.confidence, energy=args.energy, null=args.null)
    with compute_of(args) as compute:
        runtime = ModelRuntime.open(args.checkpoint, mapper=compute.mapper, device=compute.device)
        names = {m.name for m in runtime.workspace.matrices}
        if args.matrix is not None and args.matrix not in names:
            raise UsageError(f"--matrix {args.matrix}: not a weight matrix of this checkpoint")
        session = None
        if not args.no_whatif:
            if runtime.runnable is not None:
                session = WhatIfSession(runtime, BatchSpec(None, DEFAULT_POSITIONS, 0))
            else:
                print(f"note: no what-if figures ({runtime.why_not})", file=sys.stderr)
        report = build_report(runtime.workspace, settings, matrix=args.matrix, role=args.role, session=session,
                              choice=Choice(args.strategy, args.value, args.scope, args.precision), scan_by=args.scan)
        if args.figures:
            try:
                written = report.write_figures(Path(args.figures), formats)
            except FigureExportError as e:
                raise UsageError(f"--figures: {e}") from None
            print(f"{len(written)} files written to {args.figures}", file=sys.stderr)
        if args.html or not args.figures:
            write_text(args.html, report.html())
    return 0

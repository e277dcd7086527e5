"""`python -m spectral analyze CKPT`: the per-matrix table as JSON (DESIGN.md) and optional CSV."""
from __future__ import annotations

import argparse
import sys

from spectral.analysis import Settings, role_table
from spectral.commands.common import (
    StderrProgress,
    add_checkpoint_argument,
    probability,
    write_text,
)
from spectral.noise import ESTIMATORS
from spectral.nulls import NULLS
from spectral.workspace import Workspace


def register(sub) -> None:
    p = sub.add_parser("analyze", help="MP fits, edges, signal and energy ranks of every weight matrix")
    add_checkpoint_argument(p)
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="bema", help="noise σ estimator (default bema)")
    p.add_argument("--confidence", type=probability, default=0.99, help="TW confidence of the edges (default 0.99)")
    p.add_argument("--energy", type=probability, default=0.999, help="energy kept by the energy rank (default 0.999)")
    p.add_argument("--null", choices=list(NULLS), default="mp",
                   help="what signal is measured against: mp (i.i.d. Marchenko-Pastur, default), biwhitened "
                        "(MP after equalising row and column mean squares) or permutation (shuffles of the entries)")
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    p.add_argument("--csv", metavar="PATH", help="also write the per-matrix table as CSV")
    p.add_argument("--table", action="store_true", help="print the per-role table (signal vs energy rank) to stdout")
    p.set_defaults(run=run)


def format_matrix_table(analysis) -> str:
    """One line per matrix; a signal count whose null does not fit is marked "?" (its warnings say why)."""
    lines = [(f"{'matrix':<34} {'shape':>11} {'role':<9} {'σ̂':>9} {'signal':>7} {'below':>5} {'energy':>6} "
             f"{'util':>6}  tied with   (null: {analysis.settings.null}; ? = the null does not fit)")]
    for r in analysis.matrices:
        signal = f"{r.n_signal}{'' if r.null_ok else '?'}"
        lines.append(f"{r.name:<34} {r.shape[0]:>5}×{r.shape[1]:<5} {r.role:<9} {r.sigma:9.3g} {signal:>7} "
                     f"{r.n_below:>5} {r.energy_rank:>6} {r.utilization:6.1%}  {', '.join(r.tied_with) or '-'}")
    return "\n".join(lines)


def format_role_table(analysis) -> str:
    """The per-role table (markdown); the header names the null, and "null fails" counts the role's matrices
    whose diagnostics say that null does not describe them."""
    s = analysis.settings
    lines = [(f"| role | matrices | signal SVs / full rank (null {s.null}, c={s.confidence:g}) | signal % "
             f"| null fails | energy rank {s.energy:.1%} / full rank | utilization |"),
             "|---|---|---|---|---|---|---|"]
    for row in role_table(analysis):
        lines.append(f"| {row['role']} | {row['matrices']} | {row['n_signal']}/{row['full_rank']} | "
                     f"{row['signal_pct']:.1f}% | {row['null_failed']}/{row['matrices']} | "
                     f"{row['energy_rank']}/{row['full_rank']} | {row['utilization_pct']:.1f}% |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = Settings(estimator=args.estimator, confidence=args.confidence, energy=args.energy, null=args.null)
    workspace = Workspace.open(args.checkpoint)
    progress = StderrProgress("singular values" if args.null == "mp" else f"spectra and the {args.null} null")
    analysis = workspace.analyze(settings, progress=progress)
    progress.close()
    for item in analysis.summary["skipped"]:
        print(f"warning: {item['name']}: {item['reason']}", file=sys.stderr)
    if args.json not in (None, "-"):
        write_text(args.json, analysis.to_json())
    if args.csv:
        write_text(args.csv, analysis.to_csv())
    if args.table:
        print(format_role_table(analysis))
    elif args.json not in (None, "-"):
        print(format_matrix_table(analysis))
    else:
        write_text(None, analysis.to_json())
    return 0

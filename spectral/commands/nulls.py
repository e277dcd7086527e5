"""`python -m spectral nulls CKPT`: per matrix role, signal counts under the mp, biwhitened and permutation nulls side
by side, with the diagnostics that say which null fits (spectral/research/nulls.py; issue 13). No forward pass."""
from __future__ import annotations

import argparse
import json
import sys

from spectral.analysis import Settings
from spectral.commands.common import (
    StderrProgress,
    add_checkpoint_argument,
    add_compute_arguments,
    compute_of,
    probability,
    write_text,
)
from spectral.noise import ESTIMATORS
from spectral.nulls import DEFAULT_SHUFFLES, NULLS
from spectral.research.nulls import nulls
from spectral.workspace import Workspace


def null_list(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated null names ('mp,biwhitened')."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in NULLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(NULLS)}")
    return names


def register(sub) -> None:
    p = sub.add_parser("nulls", help="signal counts under the mp, biwhitened and permutation nulls, and which fits")
    add_checkpoint_argument(p)
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    p.add_argument("--nulls", type=null_list, default=NULLS,
                   help=f"which nulls, comma-separated (default all; permutation costs {DEFAULT_SHUFFLES} spectra "
                        "per matrix)")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="bema", help="noise σ estimator")
    p.add_argument("--confidence", type=probability, default=0.99, help="TW confidence of the edges")
    p.add_argument("--energy", type=probability, default=0.999, help="energy kept by the energy rank")
    add_compute_arguments(p)
    p.set_defaults(run=run)


def format_table(doc: dict) -> str:
    """Markdown per-role table: signal % under each null, how many matrices each null fits, and the signal % under
    each matrix's fitting null."""
    order = doc["nulls"]
    head = " | ".join(f"signal % {n} (fits)" for n in order)
    lines = [f"| role | matrices | {head} | signal % under a fitting null | no null fits |",
             "|---|---|" + "---|" * len(order) + "---|---|"]
    for r in doc["roles"]:
        cells = " | ".join(f"{r['signal_pct'][n]:.1f}% ({r['null_fits'][n]}/{r['matrices']})" for n in order)
        fitting = "-" if r["fitting_signal_pct"] is None else f"{r['fitting_signal_pct']:.1f}%"
        lines.append(f"| {r['role']} | {r['matrices']} | {cells} | {fitting} | {r['unfitted']} |")
    return "\n".join(lines)


def summary(doc: dict) -> str:
    t = doc["totals"]
    per_null = ", ".join(f"{n} {t['signal_pct'][n]:.1f}% (fits {t['null_fits'][n]}/{t['matrices']})"
                         for n in doc["nulls"])
    fitting = "-" if t["fitting_signal_pct"] is None else f"{t['fitting_signal_pct']:.1f}%"
    return (f"signal % of singular values: {per_null}; under a fitting null {fitting} "
            f"({t['matrices'] - t['unfitted']} of {t['matrices']} matrices fit one)")


def run(args: argparse.Namespace) -> int:
    settings = Settings(estimator=args.estimator, confidence=args.confidence, energy=args.energy)
    progress = StderrProgress("nulls")
    try:
        with compute_of(args) as compute:
            workspace = Workspace.open(args.checkpoint, mapper=compute.mapper, device=compute.device)
            result = nulls(workspace, settings, which=args.nulls, progress=progress)
    finally:
        progress.close()
    for item in workspace.skipped:
        print(f"warning: {item['name']}: {item['reason']}", file=sys.stderr)
    doc = result.to_dict()
    for note in doc["notes"]:
        print(f"note: {note}", file=sys.stderr)
    text = json.dumps(doc, indent=2, allow_nan=False)
    if args.json not in (None, "-"):
        write_text(args.json, text)
        print(format_table(doc))
        print(summary(doc))
    else:
        write_text(None, text)
    return 0

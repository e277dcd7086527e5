"""`python -m spectral thresholds CKPT`: Ave_w(φ) and the signal count as the TW confidence slides, BEMA and
Gaussian broadening side by side, beside measured agreement/KL (spectral/research/thresholds.py)."""
from __future__ import annotations

from spectral.commands.research_common import add_arguments, floats, fmt, run_view
from spectral.research.thresholds import CONFIDENCES, ESTIMATORS, thresholds


def register(sub) -> None:
    p = sub.add_parser("thresholds", help="threshold quality: Ave_w and signal count vs confidence, BEMA vs GB")
    add_arguments(p)
    p.add_argument("--confidences", type=floats, default=list(CONFIDENCES),
                   help="comma-separated TW confidences (default %(default)s)")
    p.add_argument("--estimators", default=",".join(ESTIMATORS),
                   help="comma-separated σ estimators (default %(default)s)")
    p.add_argument("--matrix", action="append", metavar="NAME",
                   help="also cut this matrix alone at each threshold (repeatable; default: the first block matrix)")
    p.set_defaults(run=run)


def summary(doc: dict) -> str:
    parts = []
    for e, corr in doc["correlation"].items():
        parts.append(f"{e}: corr(mean Ave_w, agreement) {fmt(corr['ave_w_vs_agreement'], '.2f')}")
    return f"{len(doc['matrices'])} matrices × {len(doc['confidences'])} confidences; " + "; ".join(parts)


def run(args) -> int:
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    return run_view(args, lambda ctx, settings, progress: thresholds(
        ctx, confidences=args.confidences, estimators=estimators, matrices=args.matrix, progress=progress), summary)

"""`python -m spectral whitened CKPT`: compression-vs-KL of plain SVD and activation-whitened SVD (SVD-LLM style)
over the same grid of kept parameter fractions (spectral/research/whitened.py)."""
from __future__ import annotations

from spectral.commands.research_common import add_arguments, damage, floats, run_view
from spectral.pruning import SCOPES
from spectral.research.whitened import DAMPING, KEPT_FRACTIONS, whitened


def register(sub) -> None:
    p = sub.add_parser("whitened", help="activation-aware (whitened) SVD vs plain SVD at equal compression")
    add_arguments(p)
    p.add_argument("--fractions", type=floats, default=list(KEPT_FRACTIONS),
                   help="comma-separated kept parameter fractions of each matrix (default %(default)s)")
    p.add_argument("--scope", choices=[s for s in SCOPES if s != "embedding"], default="all",
                   help="which matrices are cut (default all linear layers)")
    p.add_argument("--damping", type=float, default=DAMPING, help="ε = damping·tr(C)/n added before Cholesky")
    p.set_defaults(run=run)


def summary(doc: dict) -> str:
    pairs = [f"{p['compression']:.2f}×: {damage(doc, p)} vs {damage(doc, w)}"
             for p, w in zip(doc["plain"], doc["whitened"])]
    return "plain vs whitened SVD, " + "; ".join(pairs)


def run(args) -> int:
    return run_view(args, lambda ctx, settings, progress: whitened(ctx, fractions=args.fractions, scope=args.scope,
                                                         damping=args.damping, progress=progress), summary)

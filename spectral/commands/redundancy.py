"""`python -m spectral redundancy CKPT`: KL when each matrix alone is replaced by its rank-1 part, random values of
the same norm, or zeros; sorted from most to least redundant (spectral/research/redundancy.py)."""
from __future__ import annotations

from spectral.commands.research_common import add_arguments, fmt, run_view
from spectral.research.redundancy import redundancy


def register(sub) -> None:
    p = sub.add_parser("redundancy", help="crystallization: rank-1 / random / zero replacement of each matrix")
    add_arguments(p)
    p.add_argument("--matrix", action="append", metavar="NAME", help="only this matrix (repeatable)")
    p.set_defaults(run=run)


def summary(doc: dict) -> str:
    rows = doc["rows"][:3]
    unit = "KL" if doc.get("metric") != "cosine" else "1 - cosine"
    return "most redundant: " + ", ".join(f"{r['name']} ({r['best'] or 'top share'} {unit} {fmt(r['damage_best'])})"
                                          for r in rows)


def run(args) -> int:
    return run_view(args, lambda ctx, settings, progress: redundancy(ctx, names=args.matrix, seed=args.seed,
                                                           progress=progress), summary)

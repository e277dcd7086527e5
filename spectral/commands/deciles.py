"""`python -m spectral deciles CKPT`: remove one decile of singular values from every matrix of one type; one row
per type with ten ΔKL values, the largest decile first (spectral/research/deciles.py)."""
from __future__ import annotations

from spectral.commands.research_common import add_arguments, run_view
from spectral.research.deciles import deciles


def register(sub) -> None:
    p = sub.add_parser("deciles", help="decile ablation: ΔKL and Δperplexity per matrix type and decile")
    add_arguments(p)
    p.add_argument("--type", action="append", metavar="TYPE", dest="types",
                   help="only this matrix type (role, or module name outside blocks; repeatable)")
    p.set_defaults(run=run)


def summary(doc: dict) -> str:
    parts = []
    for r in doc["rows"]:
        order = r["rank_by_damage"]
        parts.append(f"{r['type']}: most damaging D{order[0] + 1}, smallest decile ranks "
                     f"{order.index(9) + 1}/10")
    return "; ".join(parts)


def run(args) -> int:
    return run_view(args, lambda ctx, settings, progress: deciles(ctx, types=args.types, progress=progress), summary)

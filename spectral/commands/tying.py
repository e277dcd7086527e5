"""`python -m spectral tying CKPT`: cut a tied matrix at its input use only, its output use only, or both, over a
sweep of energy levels; fitted amplification and the cliff (spectral/research/tying.py)."""
from __future__ import annotations

from spectral.commands.research_common import add_arguments, floats, fmt, run_view
from spectral.research.tying import CLIFF_AGREEMENT, ENERGY_LEVELS, tying


def register(sub) -> None:
    p = sub.add_parser("tying", help="weight-tying amplification: input-only vs output-only vs tied cuts")
    add_arguments(p)
    p.add_argument("--energies", type=floats, default=list(ENERGY_LEVELS),
                   help="comma-separated energy levels of the sweep (default %(default)s)")
    p.add_argument("--matrix", action="append", metavar="NAME", help="a tied matrix (default: every tied matrix)")
    p.add_argument("--cliff", type=float, default=CLIFF_AGREEMENT,
                   help="agreement level that marks the cliff (default %(default)s)")
    p.set_defaults(run=run)


def summary(doc: dict) -> str:
    if not doc["matrices"]:
        return "no tied matrix: " + "; ".join(doc["notes"])
    parts = []
    for m in doc["matrices"]:
        cliff = m["cliff"]
        parts.append(f"{m['name']}: amplification {fmt(m['amplification'], '.3f')} (KL tied / (input + output)), "
                     f"gain {fmt(m['gain']['tied'], '.3f')}, cliff at relative error "
                     f"{fmt(cliff['relative_error'] if cliff else None, '.3f', 'none')}")
    return "; ".join(parts)


def run(args) -> int:
    return run_view(args, lambda ctx, settings, progress: tying(ctx, args.energies, names=args.matrix,
                                                      cliff_agreement=args.cliff, progress=progress), summary)

"""`python -m spectral redundancy CKPT`: KL when each matrix alone is replaced by its rank-1 part, random values of
the same norm, or zeros; sorted from most to least redundant (spectral/research/redundancy.py). With `--heal STEPS`,
the crystallization protocol: each replacement frozen, the rest of the model healed (spectral/heal.py), ranked by what
remains after healing."""
from __future__ import annotations

from spectral.commands.common import UsageError
from spectral.commands.research_common import add_arguments, fmt, run_view
from spectral.heal import DEFAULT_LR, HEAL_MODES, HealConfig, HealError
from spectral.research.common import ResearchError
from spectral.research.redundancy import redundancy


def register(sub) -> None:
    p = sub.add_parser("redundancy", help="crystallization: rank-1 / random / zero replacement of each matrix")
    add_arguments(p)
    p.add_argument("--matrix", action="append", metavar="NAME", help="only this matrix (repeatable)")
    p.add_argument("--heal", type=int, metavar="STEPS",
                   help="freeze each replacement and heal the rest of the model for STEPS steps (the crystallization "
                        "protocol); rows are then ranked by what remains after healing")
    p.add_argument("--heal-mode", choices=list(HEAL_MODES), default="distill",
                   help="distill: match the untouched model (default); lm: next-token loss, the study's fine-tuning "
                        "(adds the 'trained' control: the matrix frozen at its trained values)")
    p.add_argument("--heal-lr", type=float, metavar="LR",
                   help=f"Adam learning rate (default {DEFAULT_LR['unfrozen']:g})")
    p.set_defaults(run=run)


def summary(doc: dict) -> str:
    rows = doc["rows"][:3]
    unit = "KL" if doc.get("metric") != "cosine" else "1 - cosine"
    if doc.get("heal"):
        return (f"most redundant after {doc['heal']['steps']} healing steps: "
                + ", ".join(f"{r['name']} ({r['healed_best']}: {unit} {fmt(r['damage_' + r['healed_best']])} -> "
                            f"{fmt(r['healed_damage_best'])})" if r["healed_best"] else r["name"] for r in rows))
    return "most redundant: " + ", ".join(f"{r['name']} ({r['best'] or 'top share'} {unit} {fmt(r['damage_best'])})"
                                          for r in rows)


def run(args) -> int:
    config = None
    if args.heal is not None:
        try:
            config = HealConfig(steps=args.heal, mode=args.heal_mode, train="unfrozen", lr=args.heal_lr,
                                seed=args.seed)
        except HealError as e:
            raise UsageError(f"--heal: {e}") from None

    def compute(ctx, settings, progress):
        try:
            return redundancy(ctx, names=args.matrix, seed=args.seed, progress=progress, heal_config=config)
        except HealError as e:
            raise ResearchError(f"--heal: {e}") from None

    return run_view(args, compute, summary)

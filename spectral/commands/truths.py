"""`python -m spectral truths CKPT`: MP signal % against energy utilisation per matrix type, and what each pruning
rule does to the outputs (the PhotonicGPT study's "two truths"; spectral/research/truths.py)."""
from __future__ import annotations

from spectral.commands.research_common import add_arguments, damage, fmt, run_view
from spectral.research.truths import truths


def register(sub) -> None:
    p = sub.add_parser("truths", help="two truths: MP signal %% vs energy utilisation, and each rule's KL")
    add_arguments(p, settings=True)
    p.set_defaults(run=run)


def summary(doc: dict) -> str:
    t = doc["totals"]
    rules = ", ".join(f"{r['label']}: agreement {fmt(r['agreement'], '.1%')} {damage(doc, r)}" for r in doc["rules"])
    return (f"signal {t['signal_pct']:.1f}% of singular values vs utilisation {t['utilization_pct']:.1f}%; "
            f"prunable by MP {t['prunable_mp_pct']:.1f}% vs by energy {t['prunable_energy_pct']:.1f}% of matrix "
            f"parameters; {rules}")


def run(args) -> int:
    return run_view(args, lambda ctx, settings, progress: truths(ctx, settings, progress=progress), summary)

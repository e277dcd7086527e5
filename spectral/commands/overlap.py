"""`python -m spectral overlap CKPT`: O_k of each right singular vector with the eigenvectors of the layer's
input-activation second moment, against random baselines, with left outliers marked (spectral/research/overlap.py)."""
from __future__ import annotations

from spectral.commands.common import UsageError
from spectral.commands.research_common import add_arguments, fmt, run_view
from spectral.research.overlap import MC_SAMPLES, overlap


def register(sub) -> None:
    p = sub.add_parser("overlap", help="overlap O_k of singular vectors with activation eigenvectors")
    add_arguments(p, settings=True)
    p.add_argument("--matrix", action="append", metavar="NAME", help="only this matrix (repeatable)")
    p.add_argument("--mc-samples", type=int, default=MC_SAMPLES, help="Monte Carlo samples of the random baseline")
    p.add_argument("--summary-only", action="store_true", help="leave the per-vector lists out of the JSON")
    p.set_defaults(run=run)


def summary(doc: dict) -> str:
    def mean(cls):
        vals = [m["summary"][cls]["mean_overlap"] for m in doc["matrices"] if m["summary"][cls]["count"]]
        return sum(vals) / len(vals) if vals else None

    return (f"{len(doc['matrices'])} matrices: mean O_k signal {fmt(mean('signal'), '.3f')}, bulk "
            f"{fmt(mean('bulk'), '.3f')}, left outliers {fmt(mean('left'), '.3f')}")


def run(args) -> int:
    if args.mc_samples < 10:
        raise UsageError(f"--mc-samples must be at least 10, got {args.mc_samples}")

    class _View:
        def __init__(self, result):
            self.result = result

        def to_dict(self):
            return self.result.to_dict(vectors=not args.summary_only)

    return run_view(args, lambda ctx, settings, progress: _View(overlap(ctx, settings, names=args.matrix,
                                                              mc_samples=args.mc_samples, seed=args.seed,
                                                              progress=progress)), summary)

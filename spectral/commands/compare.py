"""`python -m spectral compare A [B]`: two checkpoints side by side (the issue's `compare` JSON).

B may be a LoRA adapter folder (adapter_config.json and adapter_model.safetensors), compared as A + (α/r)·B·A; with
one argument, A is a folder holding a base model and its adapter. `--evaluate` also runs B's weights in A's model on
A's evaluation batch (agreement, KL) and adds `evaluation` to the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

from models.contract import NotRunnable
from spectral.analysis import Settings
from spectral.commands.common import (
    StderrProgress,
    UsageError,
    add_compute_arguments,
    compute_of,
    probability,
    write_text,
)
from spectral.compare import CompareError, Comparison, compare, evaluate_pair, open_pair
from spectral.evaluation import EvaluationError
from spectral.noise import ESTIMATORS
from spectral.runtime import ModelRuntime
from spectral.workspace import Workspace


def register(sub) -> None:
    p = sub.add_parser("compare", help="two checkpoints side by side: per-matrix changes, the spectrum of the update "
                                       "ΔW = W_B − W_A, subspace angles; LoRA adapters")
    p.add_argument("a", metavar="A", help="a checkpoint file, a Hugging Face folder or 'demo' (the base)")
    p.add_argument("b", metavar="B", nargs="?", default=None,
                   help="the other checkpoint, or a LoRA adapter folder merged onto A; omit it when A is a folder "
                        "holding a base model and its adapter")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="bema", help="noise σ estimator (default bema)")
    p.add_argument("--confidence", type=probability, default=0.99, help="TW confidence of the edges (default 0.99)")
    p.add_argument("--energy", type=probability, default=0.999, help="energy kept by the energy rank (default 0.999)")
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    add_compute_arguments(p)
    p.add_argument("--evaluate", action="store_true", help="also run B's weights in A's model on A's evaluation "
                                                           "batch: agreement and KL of B against A")
    p.set_defaults(run=run)


def format_table(result: Comparison) -> str:
    """One line per matched matrix: σ̂, signal and energy rank in A → B, the update's signal rank and size, the
    largest principal angle."""
    lines = [(f"{'matrix':<34} {'role':<9} {'σ̂ A → B':>19} {'signal':>9} {'energy':>9} {'ΔW sig':>6} "
              f"{'‖ΔW‖/‖W‖':>9} {'max θ':>6}")]
    for m in result.matrices:
        angle = f"{max(m.subspace.angles_deg):6.1f}" if m.subspace.angles_deg else f"{'-':>6}"
        lines.append(f"{m.name:<34} {m.role:<9} {m.a.sigma:9.3g}→{m.b.sigma:<9.3g} {m.a.n_signal:>4}→{m.b.n_signal:<4} "
                     f"{m.a.energy_rank:>4}→{m.b.energy_rank:<4} {m.delta.n_signal:>6} {m.delta.relative_norm:9.3g} "
                     f"{angle}")
    for side, names in (("A", result.unmatched_a), ("B", result.unmatched_b)):
        if names:
            lines.append(f"only in {side}: {', '.join(names)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = Settings(estimator=args.estimator, confidence=args.confidence, energy=args.energy)
    try:
        a, b = open_pair(args.a, args.b)
        progress = StderrProgress("compare")
        with compute_of(args) as where:
            wa = Workspace(a, mapper=where.mapper, device=where.device)
            wb = Workspace(b, mapper=where.mapper, device=where.device)
            result = compare(wa, wb, settings, progress=progress)
        progress.close()
    except CompareError as exc:
        raise UsageError(str(exc)) from None
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    payload = result.to_dict()
    if args.evaluate:
        try:
            payload["evaluation"] = evaluate_pair(ModelRuntime(wa), ModelRuntime(wb)).to_dict()
        except (NotRunnable, CompareError, EvaluationError) as exc:
            print(f"warning: no evaluation: {exc}", file=sys.stderr)
            payload["evaluation"] = None
    text = json.dumps(payload, indent=2)
    if args.json not in (None, "-"):
        write_text(args.json, text)
        print(format_table(result))
    else:
        write_text(None, text)
    return 0

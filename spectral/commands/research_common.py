"""What the research subcommands (truths, tying, thresholds, deciles, overlap, redundancy, whitened) share.

Not a subcommand itself (spectral/cli.py only imports the names in `COMMANDS`). Each research command writes one JSON
document (`--json PATH`, else stdout) and, with `--json`, prints one human line. Exit codes as everywhere: 2 bad
arguments, 3 a checkpoint that cannot be read, or cannot be run when the view needs a forward pass.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from spectral.analysis import Settings
from spectral.checkpoint import CheckpointError
from spectral.commands.common import (
    StderrProgress,
    UsageError,
    add_checkpoint_argument,
    add_compute_arguments,
    compute_of,
    probability,
    write_text,
)
from spectral.evaluation import DEFAULT_POSITIONS, EvaluationError
from spectral.noise import ESTIMATORS
from spectral.nulls import NULLS
from spectral.research.common import NeedsForward, ResearchError, jsonable
from spectral.research.context import ResearchContext


def add_arguments(p: argparse.ArgumentParser, *, evaluation: bool = True, settings: bool = False) -> None:
    """CKPT, --json, and the evaluation (--text/--positions/--seed) and analysis settings options."""
    add_checkpoint_argument(p)
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    if evaluation:
        p.add_argument("--text", metavar="FILE", help="evaluate on this text (default: the model's held-out text, "
                                                      "else sequences sampled from the model)")
        p.add_argument("--positions", type=int, default=DEFAULT_POSITIONS,
                       help=f"predicted positions in the evaluation batch (default {DEFAULT_POSITIONS})")
        p.add_argument("--seed", type=int, default=0, help="seed of sampled evaluation sequences (default 0)")
    if settings:
        p.add_argument("--estimator", choices=list(ESTIMATORS), default="bema", help="noise σ estimator")
        p.add_argument("--confidence", type=probability, default=0.99, help="TW confidence of the edges")
        p.add_argument("--energy", type=probability, default=0.999, help="energy kept by the energy rank")
        p.add_argument("--null", choices=list(NULLS), default="mp",
                       help="what the signal counts and MP cuts are measured against (default mp)")
    add_compute_arguments(p)


def floats(text: str) -> list[float]:
    """argparse type: comma-separated numbers ('0.9,0.99')."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def settings_of(args: argparse.Namespace) -> Settings:
    if args.confidence >= 1.0:
        raise UsageError(f"--confidence must be below 1, got {args.confidence}")
    return Settings(estimator=args.estimator, confidence=args.confidence, energy=args.energy, null=args.null)


def open_context(args: argparse.Namespace, compute=None) -> ResearchContext:
    """The checkpoint (CheckpointError -> exit 3), the runnable model if any, and the evaluation options."""
    text = None
    if getattr(args, "text", None) is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UsageError(f"--text {args.text}: cannot read ({e.strerror or e})") from None
    positions = getattr(args, "positions", DEFAULT_POSITIONS)
    if positions < 1:
        raise UsageError(f"--positions must be positive, got {positions}")
    return ResearchContext.open(args.checkpoint, text=text, positions=positions, seed=getattr(args, "seed", 0),
                                mapper=None if compute is None else compute.mapper,
                                device=None if compute is None else compute.device)


def run_view(args: argparse.Namespace, compute: Callable[[ResearchContext, Settings, StderrProgress], object],
             summary: Callable[[dict], str]) -> int:
    """Open the context, compute the view, write its JSON; map the engine's errors onto the exit codes."""
    settings = settings_of(args) if hasattr(args, "estimator") else Settings()
    progress = StderrProgress(args.command)
    try:
        with compute_of(args) as where:
            result = compute(open_context(args, where), settings, progress)
    except NeedsForward as e:
        raise CheckpointError(e.source, e.problem) from None
    except (ResearchError, EvaluationError) as e:
        raise UsageError(f"--text {args.text}: {e}" if isinstance(e, EvaluationError) and getattr(args, "text", None)
                         else str(e)) from None
    except KeyError as e:  # an unknown matrix name
        raise UsageError(str(e.args[0]) if e.args else "unknown matrix") from None
    finally:
        progress.close()
    doc = jsonable(result.to_dict())
    for note in doc.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    text = json.dumps(doc, indent=2, allow_nan=False)
    if args.json not in (None, "-"):
        write_text(args.json, text)
        print(summary(doc))
    else:
        write_text(None, text)
    return 0


def fmt(v, spec: str = ".3g", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def damage(doc: dict, outcome: dict) -> str:
    """'KL 0.0123' for language models, 'cosine 0.987' for encoders."""
    if doc.get("metric") == "cosine":
        return f"cosine {fmt(outcome.get('cosine'), '.4f')}"
    return f"KL {fmt(outcome.get('kl'))}"

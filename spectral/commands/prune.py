"""`python -m spectral prune CKPT --strategy ...`: cut the model, compare it with the untouched one (DESIGN.md);
with `--heal STEPS`, also train the cut model for a few steps and report the curve (spectral/heal.py, issue 16).

Exit codes: 0 success; 2 bad arguments (an out-of-range --value, an unreadable --text file, text for a model
without a tokenizer, an unknown --override matrix); 3 a checkpoint that cannot be read, or that can be read but
not run (an architecture without a forward pass here: `analyze` still works on it). Errors are one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spectral.analysis import Settings
from spectral.checkpoint import CheckpointError
from spectral.commands.common import (
    LOCAL,
    Compute,
    StderrProgress,
    UsageError,
    add_checkpoint_argument,
    add_compute_arguments,
    compute_of,
    write_text,
)
from spectral.evaluation import DEFAULT_POSITIONS, EvaluationError
from spectral.heal import (
    DEFAULT_LR,
    HEAL_MODES,
    HEAL_TRAIN,
    HealConfig,
    HealError,
    heal,
    save_healed,
)
from spectral.noise import ESTIMATORS
from spectral.nulls import NULLS
from spectral.pruning import (
    DEFAULT_VALUES,
    PRECISIONS,
    SCOPES,
    STRATEGIES,
    PlanError,
    Strategy,
)
from spectral.runtime import BatchSpec, ModelRuntime
from spectral.whatif import REFERENCE, Choice, WhatIfSession

EPILOG = """strategies: mp (keep z > VALUE, default 2.0234), energy (keep the fraction VALUE of each matrix's energy,
default 0.999), rank (keep the fraction VALUE of each matrix's rank, default 0.5), optimal (Gavish-Donoho hard
threshold), none (no cut; with --precision the quantisation alone); extras: band (remove decile VALUE of the
singular values, 0 = largest), rank1, random (same Frobenius norm, seed VALUE), zero.
heal: --heal STEPS trains the cut model on the evaluation text's training split (never the evaluated positions) by
distillation to the untouched model (KL; cosine for encoders) or next-token loss (--heal-mode lm); --heal-train
factors (the cut matrices' low-rank factors), unfrozen (everything but rank1/random/zero replacements) or all.
exit codes: 2 bad arguments, 3 checkpoint unreadable or not runnable."""


def register(sub) -> None:
    p = sub.add_parser("prune", help="cut weight matrices and measure agreement, KL and perplexity",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_argument(p)
    add_compute_arguments(p)
    p.add_argument("--strategy", choices=list(STRATEGIES), help="how each matrix is cut (required unless --reference)")
    p.add_argument("--value", type=float, help="the strategy's threshold (see below for defaults)")
    p.add_argument("--scope", choices=list(SCOPES), default="all", help="which matrices are cut (default all)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="storage precision of the matrices in scope after the cut (default fp32: unchanged)")
    p.add_argument("--text", metavar="FILE", help="evaluate on this text (default: the model's held-out text, "
                                                  "else sequences sampled from the model)")
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    p.add_argument("--save", metavar="PATH", help="write the cut model as a .safetensors file")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="bema",
                   help="noise σ estimator behind the mp z-scores (default bema)")
    p.add_argument("--null", choices=list(NULLS), default="mp",
                   help="what the mp strategy's z-scores are measured against (default mp, RMT.md §11)")
    p.add_argument("--positions", type=int, default=DEFAULT_POSITIONS,
                   help=f"predicted positions in the evaluation batch (default {DEFAULT_POSITIONS})")
    p.add_argument("--seed", type=int, default=0, help="seed of sampled evaluation sequences (default 0)")
    p.add_argument("--override", action="append", default=[], metavar="MATRIX=STRATEGY[:VALUE]",
                   help="give one matrix its own strategy, e.g. tok_emb.weight=none (repeatable)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter the checkpoint does not record (e.g. n_head=12 for a bare nanoGPT state "
                        "dict); the error message names the ones needed")
    p.add_argument("--scan", choices=["matrix", "role"],
                   help="also cut one matrix (or role) at a time and report the KL each causes alone")
    p.add_argument("--estimate", action="store_true",
                   help="also compute the quick estimate on the fixed subset (JSON key `estimate`, with standard "
                        "errors) before the full batch")
    p.add_argument("--heal", type=int, metavar="STEPS",
                   help="after the cut, train for STEPS steps and add the curve (JSON `heal`; see below)")
    p.add_argument("--heal-mode", choices=list(HEAL_MODES), default="distill",
                   help="distill: match the untouched model (KL; cosine for encoders, default); lm: next-token loss")
    p.add_argument("--heal-train", choices=list(HEAL_TRAIN), default="factors",
                   help="what trains: factors (the cut matrices' low-rank factors, default), unfrozen, all")
    p.add_argument("--heal-lr", type=float, metavar="LR",
                   help="Adam learning rate (default " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--save-healed", metavar="PATH",
                   help="write the healed model as .safetensors (factorised matrices kept factorised; the file's "
                        "metadata says how to read it)")
    p.add_argument("--reference", action="store_true",
                   help=f"run every reference strategy ({', '.join(r.label for r in REFERENCE)}) in --scope and "
                        "print them as one JSON list")
    p.set_defaults(run=run)


def parse_override(text: str) -> tuple[str, str, float | None]:
    """--override MATRIX=STRATEGY[:VALUE] as (matrix, strategy, value)."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise UsageError(f"--override {text!r}: expected MATRIX=STRATEGY[:VALUE]")
    strategy, _, value = spec.partition(":")
    try:
        parsed = float(value) if value else None
        Strategy(strategy, parsed)  # validates the strategy and its value
    except ValueError as e:
        raise UsageError(f"--override {text!r}: {e}") from None
    return name, strategy, parsed


def open_session(args: argparse.Namespace, compute: Compute = LOCAL) -> WhatIfSession:
    """The checkpoint's runtime and a what-if session on the evaluation batch the options describe."""
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UsageError(f"--text {args.text}: cannot read ({e.strerror or e})") from None
    runtime = ModelRuntime.open(args.checkpoint, hyperparameters=parse_config(args.config), mapper=compute.mapper,
                                device=compute.device)
    if runtime.runnable is None:
        hint = ("; give " + ", ".join(f"--config {n.name}=..." for n in runtime.needs)) if runtime.needs else ""
        raise CheckpointError(runtime.workspace.checkpoint.source,
                              f"cannot be run, so no what-if ({runtime.why_not}){hint}; `analyze` still works")
    try:
        return WhatIfSession(runtime, BatchSpec(text, args.positions, args.seed))
    except EvaluationError as e:
        raise UsageError(f"--text {args.text}: {e}" if text is not None else str(e)) from None


def run(args: argparse.Namespace) -> int:
    with compute_of(args) as compute:
        return run_on(args, compute)


def run_on(args: argparse.Namespace, compute: Compute) -> int:
    if args.strategy is None and not args.reference:
        raise UsageError("--strategy is required (or --reference for every reference strategy)")
    args.strategy = args.strategy or "none"
    if args.value is not None and args.strategy not in DEFAULT_VALUES:
        raise UsageError(f"--value does not apply to --strategy {args.strategy}")
    if args.positions < 1:
        raise UsageError(f"--positions must be positive, got {args.positions}")
    try:
        Strategy(args.strategy, args.value, args.precision)
    except PlanError as e:
        raise UsageError(str(e)) from None
    heal_config = heal_config_of(args)
    choice = Choice(args.strategy, args.value, args.scope, args.precision,
                    tuple(parse_override(o) for o in args.override))
    settings = Settings(estimator=args.estimator, null=args.null)
    session = open_session(args, compute)
    if args.reference:
        if heal_config is not None:
            raise UsageError("--heal heals one --strategy, not the --reference list")
        results = session.reference_results(args.scope, settings)
        write_text(args.json, json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    progress = StderrProgress("SVD factors")
    try:
        result = session.run(choice, settings, progress=progress,
                             on_estimate=(lambda r: print(f"estimate: {estimate_line(r)}", file=sys.stderr))
                             if args.estimate else None)
    except PlanError as e:
        raise UsageError(str(e)) from None
    finally:
        progress.close()
    out = result.to_dict()
    if args.scan:
        scan_progress = StderrProgress(f"sensitivity by {args.scan}")
        out["sensitivity"] = session.scan(choice, by=args.scan, settings=settings, progress=scan_progress)
        scan_progress.close()
    for warning in out["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.save:
        try:
            session.save(args.save)
        except OSError as e:
            raise UsageError(f"--save {args.save}: cannot write ({e.strerror or e})") from None
    if heal_config is not None:
        healed = run_heal(session, heal_config)
        out["heal"] = healed.to_dict()
        if args.save_healed:
            try:
                save_healed(healed, args.save_healed)
            except OSError as e:
                raise UsageError(f"--save-healed {args.save_healed}: cannot write ({e.strerror or e})") from None
    text_out = json.dumps(out, indent=2)
    if args.json not in (None, "-"):
        write_text(args.json, text_out)
        print(summary_line(out))
    else:
        write_text(None, text_out)
    return 0


def heal_config_of(args: argparse.Namespace) -> HealConfig | None:
    """The heal the options ask for (None without --heal); bad values are usage errors."""
    if args.heal is None:
        if args.save_healed:
            raise UsageError("--save-healed needs --heal STEPS")
        return None
    if args.precision != "fp32":
        raise UsageError(f"--heal: healing trains in float32 and --precision {args.precision} stores less; heal an "
                         "fp32 cut (quantise after healing)")
    try:
        return HealConfig(steps=args.heal, mode=args.heal_mode, train=args.heal_train, lr=args.heal_lr,
                          seed=args.seed)
    except HealError as e:
        raise UsageError(f"--heal: {e}") from None


def run_heal(session: WhatIfSession, config: HealConfig):
    """Heal the session's current cut with a progress bar; a heal that cannot run is a usage error."""
    progress = StderrProgress("heal")
    try:
        return heal(session, config, progress=progress)
    except HealError as e:
        raise UsageError(f"--heal: {e}") from None
    finally:
        progress.close()


def heal_line(heal_doc: dict) -> str:
    """'healed 200 steps (distill, factors): agreement 17.8% -> 62.0%, KL 2.46 -> 0.41 nats, 38.1 s'."""
    first, last = heal_doc["curve"][0], heal_doc["curve"][-1]
    damage = (f"KL {first['kl']:.3g} -> {last['kl']:.3g} nats" if first["kl"] is not None
              else f"cosine {first.get('cosine', float('nan')):.4f} -> {last.get('cosine', float('nan')):.4f}")
    return (f"healed {heal_doc['steps']} steps ({heal_doc['mode']}, {heal_doc['train']}): agreement "
            f"{first['agreement']:.1%} -> {last['agreement']:.1%}, {damage}, {heal_doc['seconds']:.1f} s")


def estimate_line(result) -> str:
    """'agreement 41.2% ± 3.1%, KL 2.31 ± 0.12 nats (256 positions)' for a quick estimate."""
    m = result.metrics
    kl = f"KL {m.kl:.3g} ± {m.kl_se:.2g} nats" if m.kl is not None else f"cosine {m.cosine:.4f}"
    return f"agreement {m.agreement:.1%} ± {m.agreement_se:.1%}, {kl} ({m.positions} positions)"


def summary_line(out: dict) -> str:
    """One human line: strategy, agreement, KL, perplexity, parameters, compression, evaluation batch."""
    value = "" if out["value"] is None else f" {out['value']:g}"
    ppl = ""
    if out["perplexity_before"] is not None:
        ppl = f", perplexity {out['perplexity_before']:.2f} -> {out['perplexity_after']:.2f}"
    kl = f"KL {out['kl']:.3g} nats" if out["kl"] is not None else f"cosine {out['cosine']:.4f}"
    ev = out["eval"]
    return (f"{out['strategy']}{value} ({out['scope']}, {out['precision']}): agreement {out['agreement']:.1%}, {kl}"
            f"{ppl}; params {out['params_before']:,} -> {out['params_after']:,}, compression "
            f"{out['compression']:.2f}x; eval {ev['source']} ({ev['sequences']} sequences, {ev['tokens']} tokens)"
            + (f"; {heal_line(out['heal'])}" if out.get("heal") else ""))


def parse_config(items: list[str]) -> dict:
    """--config KEY=VALUE pairs as a dict; values are read as int, then float, else kept as text."""
    config = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--config {item!r}: expected KEY=VALUE, e.g. n_head=12")
        for cast in (int, float):
            try:
                config[key] = cast(raw)
                break
            except ValueError:
                continue
        else:
            config[key] = raw
    return config

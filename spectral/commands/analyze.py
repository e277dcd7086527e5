"""`python -m spectral analyze CKPT [CKPT ...]`: the per-matrix table as JSON (DESIGN.md) and optional CSV.

Several checkpoints (or a folder of them) are one map over checkpoint × matrix (on a Ray cluster with `--ray`, so
the spectra of all of them share the workers); their documents go to stdout one per line, or to `--json` as a list.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spectral.analysis import Settings, role_table
from spectral.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from spectral.commands.common import (
    StderrProgress,
    UsageError,
    add_compute_arguments,
    compute_of,
    note_precision,
    probability,
    write_text,
)
from spectral.distributed import Job
from spectral.noise import ESTIMATORS
from spectral.nulls import NULLS
from spectral.workspace import Workspace


def register(sub) -> None:
    p = sub.add_parser("analyze", help="MP fits, edges, signal and energy ranks of every weight matrix")
    p.add_argument("checkpoints", metavar="CKPT", nargs="+",
                   help="a .safetensors/.pt/.pth/.bin/.gguf file, a Hugging Face folder, the word 'demo', or a "
                        "folder of checkpoints (a training run); several are analysed in one map")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="bema", help="noise σ estimator (default bema)")
    p.add_argument("--confidence", type=probability, default=0.99, help="TW confidence of the edges (default 0.99)")
    p.add_argument("--energy", type=probability, default=0.999, help="energy kept by the energy rank (default 0.999)")
    p.add_argument("--null", choices=list(NULLS), default="mp",
                   help="what signal is measured against: mp (i.i.d. Marchenko-Pastur, default), biwhitened "
                        "(MP after equalising row and column mean squares) or permutation (shuffles of the entries)")
    p.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    p.add_argument("--csv", metavar="PATH", help="also write the per-matrix table as CSV")
    p.add_argument("--table", action="store_true", help="print the per-role table (signal vs energy rank) to stdout")
    add_compute_arguments(p)
    p.set_defaults(run=run)


def format_matrix_table(analysis) -> str:
    """One line per matrix; a signal count whose null does not fit is marked "?" (its warnings say why)."""
    lines = [(f"{'matrix':<34} {'shape':>11} {'role':<9} {'σ̂':>9} {'signal':>7} {'below':>5} {'energy':>6} "
             f"{'util':>6}  tied with   (null: {analysis.settings.null}; ? = the null does not fit)")]
    for r in analysis.matrices:
        signal = f"{r.n_signal}{'' if r.null_ok else '?'}"
        lines.append(f"{r.name:<34} {r.shape[0]:>5}×{r.shape[1]:<5} {r.role:<9} {r.sigma:9.3g} {signal:>7} "
                     f"{r.n_below:>5} {r.energy_rank:>6} {r.utilization:6.1%}  {', '.join(r.tied_with) or '-'}")
    return "\n".join(lines)


def format_role_table(analysis) -> str:
    """The per-role table (markdown); the header names the null, and "null fails" counts the role's matrices
    whose diagnostics say that null does not describe them."""
    s = analysis.settings
    lines = [(f"| role | matrices | signal SVs / full rank (null {s.null}, c={s.confidence:g}) | signal % "
             f"| null fails | energy rank {s.energy:.1%} / full rank | utilization |"),
             "|---|---|---|---|---|---|---|"]
    for row in role_table(analysis):
        lines.append(f"| {row['role']} | {row['matrices']} | {row['n_signal']}/{row['full_rank']} | "
                     f"{row['signal_pct']:.1f}% | {row['null_failed']}/{row['matrices']} | "
                     f"{row['energy_rank']}/{row['full_rank']} | {row['utilization_pct']:.1f}% |")
    return "\n".join(lines)


def expand(sources: list[str]) -> list[str]:
    """The checkpoints named: a folder that is not itself a checkpoint (no config.json or shard index) stands for the
    checkpoints it holds (`list_checkpoints`, in name order)."""
    found = []
    for source in sources:
        path = Path(source)
        if path.is_dir() and not (path / "config.json").is_file() and not any(path.glob("*.index.json")):
            inside = list_checkpoints(path)
            if not inside:
                raise UsageError(f"{source}: a folder holding no checkpoints")
            found += [str(path / entry) for entry in inside]
        else:
            found.append(source)
    return found


def run(args: argparse.Namespace) -> int:
    settings = Settings(estimator=args.estimator, confidence=args.confidence, energy=args.energy, null=args.null)
    sources = expand(args.checkpoints)
    if len(sources) == 1:
        with compute_of(args) as compute:
            workspace = Workspace.open(sources[0], mapper=compute.mapper, device=compute.device)
            note_precision(compute, workspace)
            return run_one(args, settings, workspace)
    if args.csv:
        raise UsageError(f"--csv writes one checkpoint's table; {len(sources)} checkpoints given (use --json)")
    return run_many(args, settings, sources)


def run_one(args: argparse.Namespace, settings: Settings, workspace: Workspace) -> int:
    progress = StderrProgress("singular values" if args.null == "mp" else f"spectra and the {args.null} null")
    analysis = workspace.analyze(settings, progress=progress)
    progress.close()
    for item in analysis.summary["skipped"]:
        print(f"warning: {item['name']}: {item['reason']}", file=sys.stderr)
    if args.json not in (None, "-"):
        write_text(args.json, analysis.to_json())
    if args.csv:
        write_text(args.csv, analysis.to_csv())
    if args.table:
        print(format_role_table(analysis))
    elif args.json not in (None, "-"):
        print(format_matrix_table(analysis))
    else:
        write_text(None, analysis.to_json())
    return 0


def run_many(args: argparse.Namespace, settings: Settings, sources: list[str]) -> int:
    """Open every checkpoint (one that cannot be read is reported and left out, exit 3 at the end), map the spectra
    of all of them at once, then analyse each from what the map left in its workspace."""
    failed = 0
    with compute_of(args) as compute:
        workspaces = []
        for source in sources:
            try:
                checkpoint = load_checkpoint(source)
            except CheckpointError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
                continue
            workspaces.append(Workspace(checkpoint, mapper=compute.mapper, device=compute.device))
        if workspaces:
            note_precision(compute, workspaces[0])
        progress = StderrProgress(f"spectra of {len(workspaces)} checkpoints")
        if compute.mapper is not None:
            todo = [(w, w.spectra_from_disk()) for w in workspaces]
            todo = [(w, infos) for w, infos in todo if infos]
            found = compute.mapper.spectra_many([Job(w.checkpoint, tuple(infos)) for w, infos in todo], progress)
            for (workspace, _), results in zip(todo, found):
                workspace.adopt(results)
        analyses = []
        for i, workspace in enumerate(workspaces):
            analyses.append(workspace.analyze(settings))
            progress(i + 1, len(workspaces), workspace.checkpoint.source)
        progress.close()
    for analysis in analyses:
        for item in analysis.summary["skipped"]:
            print(f"warning: {analysis.checkpoint['path']}: {item['name']}: {item['reason']}", file=sys.stderr)
    documents = [json.loads(a.to_json()) for a in analyses]
    if args.json not in (None, "-"):
        write_text(args.json, json.dumps(documents, indent=2))
    if args.json in (None, "-") and not args.table:
        write_text(None, "\n".join(json.dumps(d) for d in documents))
    else:
        for analysis in analyses:
            print(f"## {analysis.checkpoint['path']}")
            print(format_role_table(analysis) if args.table else format_matrix_table(analysis))
    return 3 if failed else 0

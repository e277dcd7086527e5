"""README's seed-study table for Heal (issue 16), produced by the CLI on the demo.

    python bench/heal_tables.py [--matrix blocks.2.attn.c_proj.weight] [--steps 50] [--cut-steps 200] [--out FILE]

Runs, each as `python -m spectral ...` in a fresh process:
1. the crystallization protocol (papers 003) on one attention output projection: `redundancy demo --matrix M
   --heal STEPS --heal-mode lm` (the study's fine-tuning, with the "trained" control: M frozen at its trained values)
   and `--heal STEPS` (distillation): M replaced by rank-1 / random / zeros, frozen, the rest healed;
2. the MP-z and energy cuts before and after healing their factors: `prune demo --strategy mp|energy --heal N`.
Prints the Markdown tables (and writes them to --out).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUTS = (("MP z > 2.0234", ["--strategy", "mp"]), ("energy 99.9%", ["--strategy", "energy", "--value", "0.999"]),
        ("energy 99%", ["--strategy", "energy", "--value", "0.99"]))
LABELS = {"trained": "trained values (frozen)", "rank1": "rank-1 (frozen)", "random": "random, same norm (frozen)",
          "zero": "zeros (frozen)"}


def cli(*argv: str) -> dict:
    """`python -m spectral ARGV --json TMP` in a fresh process; its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        command = [sys.executable, "-m", "spectral", *argv, "--json", str(out)]
        print("$ python -m spectral " + " ".join(argv), file=sys.stderr, flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def num(v, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def crystallization(matrix: str, steps: int) -> str:
    lm = cli("redundancy", "demo", "--matrix", matrix, "--heal", str(steps), "--heal-mode", "lm")
    distill = cli("redundancy", "demo", "--matrix", matrix, "--heal", str(steps))
    (row_lm,), (row_d,) = lm["rows"], distill["rows"]
    ppl0 = lm["perplexity_before"]
    lines = [(f"Crystallization protocol on `{matrix}` (participation ratio {row_lm['participation_ratio']:.1f} of "
             f"{min(row_lm['shape'])}, top component {pct(row_lm['top_share'])} of the energy): the matrix is replaced, "
             f"frozen, and the rest of the demo trains {steps} steps; evaluation on the held-out text "
             f"({lm['eval']['tokens']:,} positions), perplexity of the untouched model {ppl0:.2f}."),
             "",
             ("| matrix replaced by | before: KL | agreement | perplexity | after distillation: KL | agreement "
             "| perplexity | after fine-tuning (lm): perplexity | KL | agreement |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ("trained", "rank1", "random", "zero"):
        if r == "trained":
            before = (0.0, 1.0, ppl0)
            after_d = (None, None, None)  # distillation's optimum is the untouched model itself: not run
        else:
            dp = row_lm[f"delta_perplexity_{r}"]
            before = (row_lm[f"kl_{r}"], row_lm[f"agreement_{r}"], None if dp is None else ppl0 + dp)
            after_d = (row_d[f"healed_kl_{r}"], row_d[f"healed_agreement_{r}"], row_d[f"healed_perplexity_{r}"])
        after_lm = (row_lm[f"healed_perplexity_{r}"], row_lm[f"healed_kl_{r}"], row_lm[f"healed_agreement_{r}"])
        lines.append(f"| {LABELS[r]} | {num(before[0], '.4f')} | {pct(before[1])} | {num(before[2], '.2f')} "
                     f"| {num(after_d[0], '.4f')} | {pct(after_d[1])} | {num(after_d[2], '.2f')} "
                     f"| {num(after_lm[0], '.2f')} | {num(after_lm[1], '.4f')} | {pct(after_lm[2])} |")
    lines.append("")
    lines.append(f"Heal: Adam lr {lm['heal']['lr']:g}, batch 8 × 128 tokens of the demo's training text, seed 0; "
                 f"{lm['heal']['seconds'] + distill['heal']['seconds']:.0f} s of healing in all.")
    return "\n".join(lines)


def cuts(steps: int) -> str:
    lines = [(f"Whole-model cuts before and after {steps} steps of healing their low-rank factors (distillation, "
             "`--heal-train factors`: the healed model stores exactly what the cut stores)."),
             "",
             ("| cut | compression | before: agreement | KL | perplexity | after: agreement | KL | perplexity "
             "| seconds |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, argv in CUTS:
        doc = cli("prune", "demo", *argv, "--heal", str(steps))
        first, last = doc["heal"]["curve"][0], doc["heal"]["curve"][-1]
        lines.append(f"| {label} | {doc['compression']:.2f}x | {pct(first['agreement'])} | {num(first['kl'])} "
                     f"| {num(first['perplexity'], '.1f')} | {pct(last['agreement'])} | {num(last['kl'])} "
                     f"| {num(last['perplexity'], '.1f')} | {doc['heal']['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", default="blocks.2.attn.c_proj.weight",
                        help="the attention output projection of the crystallization rows")
    parser.add_argument("--steps", type=int, default=50, help="healing steps of the protocol (the study: 50)")
    parser.add_argument("--cut-steps", type=int, default=200, help="healing steps of the MP-z and energy cuts")
    parser.add_argument("--out", metavar="FILE", help="also write the Markdown here")
    args = parser.parse_args(argv)
    text = crystallization(args.matrix, args.steps) + "\n\n" + cuts(args.cut_steps) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

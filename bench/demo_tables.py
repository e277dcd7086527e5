"""Print README's two demo tables by running the CLI exactly as a user would (no engine calls of our own).

    python bench/demo_tables.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = [  # (label, CLI arguments)
    ("MP z > 2.0234", ["--strategy", "mp"]),
    ("energy 99.9%", ["--strategy", "energy", "--value", "0.999"]),
    ("energy 99.5%", ["--strategy", "energy", "--value", "0.995"]),
    ("energy 99%", ["--strategy", "energy", "--value", "0.99"]),
    ("energy 98%", ["--strategy", "energy", "--value", "0.98"]),
    ("Gavish-Donoho", ["--strategy", "optimal"]),
    ("fp16 only", ["--strategy", "none", "--precision", "fp16"]),
    ("bf16 only", ["--strategy", "none", "--precision", "bf16"]),
    ("int8 only", ["--strategy", "none", "--precision", "int8"]),
]


def cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "spectral", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    print(cli("analyze", "demo", "--table"))
    print("| what-if | top-1 agreement | KL (nats/position) | perplexity | parameters kept | compression |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "p.json")
        for label, args in ROWS:
            cli("prune", "demo", *args, "--json", out)
            d = json.loads(Path(out).read_text())
            print(f"| {label} | {d['agreement']:.1%} | {d['kl']:.2g} | {d['perplexity_before']:.1f} → "
                  f"{d['perplexity_after']:.1f} | {d['params_after']:,} / {d['params_before']:,} "
                  f"({d['params_after'] / d['params_before']:.1%}) | {d['compression']:.2f}x |")
    print(f"\nevaluation: {d['eval']}")


if __name__ == "__main__":
    main()

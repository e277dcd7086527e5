"""Print README's two demo tables by running the CLI exactly as a user would (no engine calls of our own).

    python bench/demo_tables.py

The what-if rows are the reference strategies (spectral/whatif.py `REFERENCE`), from one `prune demo --reference`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "spectral", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    print(cli("analyze", "demo", "--table"))
    print("| what-if | top-1 agreement | KL (nats/position) | perplexity | parameters kept | compression |")
    print("|---|---|---|---|---|---|")
    rows = json.loads(cli("prune", "demo", "--reference"))
    for d in rows:
        print(f"| {d['label']} | {d['agreement']:.1%} | {d['kl']:.2g} | {d['perplexity_before']:.1f} → "
              f"{d['perplexity_after']:.1f} | {d['params_after']:,} / {d['params_before']:,} "
              f"({d['params_after'] / d['params_before']:.1%}) | {d['compression']:.2f}x |")
    print(f"\nevaluation: {rows[0]['eval']}")


if __name__ == "__main__":
    main()

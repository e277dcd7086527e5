"""Healing speed and outcome on the demo (issue 16 targets), measured side by side in one process.

    python bench/bench_heal.py                   # all cores (the CLI's threads); --threads 2 for the 2-core target
    python bench/bench_heal.py --steps 200 --json bench-heal.json

For the demo's MP-z cut (z > 2.0234, every matrix): the median of a bare forward pass of one training batch (8 × 128
tokens, the floor), the median time of one healing step (teacher forward + student forward and backward + Adam; factors
only), their ratio, and healing steps per second; then a full `--steps` heal (default 200) with the curve's evaluations
(the Pruning page's 2,048 positions every 10 steps): its seconds, agreement and KL before and after; and the stored
parameters of the healed file against the cut's. Targets: >= 5 steps/s on 2 cores; 200 steps in <= 60 s; factors-only
healing stores no more parameters than the cut. On a shared machine the times are noisy (the ratio less so).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from spectral.heal import HealConfig, Healer, healed_state
from spectral.threads import configure_threads
from spectral.whatif import Choice, WhatIfSession

BATCH, LENGTH = 8, 128
REPEATS = 7


def one_step(healer: Healer, optimizer: torch.optim.Optimizer, inputs, targets) -> None:
    """What `Healer.run` does per step (without the schedule's evaluations)."""
    with healer.lock:
        loss = healer.loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(healer.leaves, 1.0)
    optimizer.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the CLI's, every core)")
    parser.add_argument("--steps", type=int, default=200, help="steps of the full heal (default 200)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    threads = configure_threads(args.threads)

    session = WhatIfSession.open("demo")
    cut = session.run(Choice("mp"))
    healer = Healer(session, HealConfig(steps=args.steps, batch=BATCH, length=LENGTH))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(healer.leaves, lr=healer.config.learning_rate)
    forward, step = [], []
    for _ in range(REPEATS):  # interleaved, so both see the same machine
        inputs, targets = healer.data.draw(generator, BATCH)
        t0 = time.perf_counter()
        with torch.inference_mode():
            session.runnable.forward(inputs)
        t1 = time.perf_counter()
        one_step(healer, optimizer, inputs, targets)
        t2 = time.perf_counter()
        forward.append(t1 - t0)
        step.append(t2 - t1)
    forward_s, step_s = statistics.median(forward), statistics.median(step)

    fresh = Healer(session, HealConfig(steps=args.steps, batch=BATCH, length=LENGTH))  # untouched by the timing
    result = fresh.run()
    tensors, _ = healed_state(result)
    aliases = {n for group in session.workspace.checkpoint.tied_groups for n in group[1:]}
    stored = sum(t.numel() for n, t in tensors.items() if n not in aliases)
    before, after = result.before, result.after
    doc = {
        "threads": threads, "batch": [BATCH, LENGTH], "cut": cut.label or "MP z > 2.0234",
        "forward_seconds": forward_s, "step_seconds": step_s, "step_over_forward": step_s / forward_s,
        "steps_per_second": 1.0 / step_s, "heal_steps": result.steps, "heal_seconds": result.seconds,
        "heal_steps_per_second_in_run": result.steps_per_second,
        "before": {"agreement": before.agreement, "kl": before.kl, "perplexity": before.perplexity},
        "after": {"agreement": after.agreement, "kl": after.kl, "perplexity": after.perplexity},
        "trainable_params": result.trainable_params, "stored_params_healed": stored,
        "stored_params_cut": cut.prune.params_after, "train_source": result.train_source,
    }
    print(f"demo, MP z > 2.0234 cut, {threads} torch threads, batch {BATCH} x {LENGTH} tokens")
    print(f"  bare forward {1000 * forward_s:.1f} ms | healing step {1000 * step_s:.1f} ms | ratio "
          f"{step_s / forward_s:.2f}x | {1 / step_s:.1f} steps/s (target >= 5 on 2 cores)")
    print(f"  {result.steps}-step heal incl. {len(result.curve)} evaluations: {result.seconds:.1f} s (target <= 60 s); "
          f"{result.steps_per_second:.1f} steps/s inside the run")
    print(f"  agreement {before.agreement:.1%} -> {after.agreement:.1%} | KL {before.kl:.3f} -> {after.kl:.3f} nats | "
          f"perplexity {before.perplexity:.1f} -> {after.perplexity:.1f}")
    print(f"  stored parameters: healed {stored:,} vs cut {cut.prune.params_after:,} "
          f"({'no more' if stored <= cut.prune.params_after else 'MORE'}); {result.trainable_params:,} trained")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One what-if slider move (new plan -> rebuilt matrices -> evaluation -> metrics) against a bare forward pass.

    python bench/bench_whatif.py                 # the demo, then a GPT-2-small-sized random model
    python bench/bench_whatif.py --model demo    # one of them (each runs in its own process for a clean peak)

For each model, side by side in one process, interleaved: the median of a bare forward pass of the evaluation batch
(the floor), the median of >= 10 slider moves (energy threshold stepped one notch at a time, as a user drags it; then rank
fractions; every value distinct), their ratio, the rebuild part of a move, and peak memory (ru_maxrss, plus the bytes of what the engine
holds: model, SVD factors, working copy, reference outputs). SVD factors and the reference outputs are computed
once before timing (reported separately): they are the one-off cost of opening the Pruning page.
Targets (issue 4): demo <= 0.3 s median; GPT-2-small < 3 s; a move within 1.5x of the floor plus the rebuild.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from models.gpt import GPT, GPTConfig
from models.registry import runnable_model
from spectral.checkpoint import load_checkpoint
from spectral.evaluation import Evaluator, make_eval_batch, token_batch
from spectral.runtime import ModelRuntime
from spectral.whatif import Choice, WhatIfSession
from spectral.threads import configure_threads
from spectral.workspace import Workspace

# distinct values: a value seen before reuses its metrics (the session remembers them), which would flatter the median
ENERGY_MOVES = [0.999, 0.998, 0.997, 0.996, 0.995, 0.993, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95]
RANK_MOVES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.55, 0.65, 0.75]
GPT2_SMALL = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def open_model(name: str, tmp: Path):
    """(workspace, runnable, batch) for the demo or a freshly saved random GPT-2-small-sized model."""
    if name == "demo":
        ckpt = load_checkpoint("demo")
        runnable = runnable_model(ckpt)
        return Workspace(ckpt), runnable, make_eval_batch(runnable)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with torch.no_grad():
        model = GPT(GPT2_SMALL)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    del model
    path = tmp / "gpt2-small-random.safetensors"
    save_file(tensors, str(path), metadata={"architecture": "spectra-demo-gpt",
                                            "config": json.dumps(GPT2_SMALL.to_dict()),
                                            "tied": "tok_emb.weight,lm_head.weight"})
    del tensors
    ckpt = load_checkpoint(path)
    runnable = runnable_model(ckpt)
    ids = torch.randint(0, GPT2_SMALL.vocab_size, (16, 129), generator=torch.Generator().manual_seed(0))
    return Workspace(ckpt), runnable, token_batch(ids, detail="random tokens")


def bench(name: str, n_moves: int) -> dict:
    threads = configure_threads()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        workspace, runnable, batch = open_model(name, Path(tmp))
        t_open = time.perf_counter() - t0

        t0 = time.perf_counter()
        evaluator = Evaluator(runnable, batch)
        t_reference = time.perf_counter() - t0
        t0 = time.perf_counter()
        workspace.spectra()
        t_spectra = time.perf_counter() - t0
        t0 = time.perf_counter()
        for info in workspace.matrices:
            workspace.factors(info.name)
        t_factors = time.perf_counter() - t0

        ids = batch.input_ids

        @torch.inference_mode()
        def bare():
            runnable.module(ids)

        bare()  # warm-up
        whatif = WhatIfSession(ModelRuntime(workspace, runnable=runnable), evaluator=evaluator)
        whatif.run(Choice("energy", 0.9995))  # warm-up: allocates the working copy
        # Interleaved (bare, move, bare, move, ...): on a shared machine both then see the same load.
        moves, bare_times = [], []
        n_moves = max(n_moves, 10)
        n_energy = min(len(ENERGY_MOVES), round(n_moves * len(ENERGY_MOVES) / (len(ENERGY_MOVES) + len(RANK_MOVES))))
        schedule = [("energy", v) for v in ENERGY_MOVES[:n_energy]] + \
            [("rank", v) for v in RANK_MOVES[: n_moves - n_energy]]
        for strategy, value in schedule:
            t0 = time.perf_counter()
            bare()
            bare_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = whatif.run(Choice(strategy, value))
            total = time.perf_counter() - t0
            moves.append({"strategy": strategy, "value": value, "total": total,
                          "rebuild": result.timings["rebuild"], "evaluate": result.timings["evaluate"],
                          "plan": result.timings["plan"], "rebuilt": len(result.prune.rebuilt),
                          "agreement": result.metrics.agreement, "kl": result.metrics.kl})
        bare_median = statistics.median(bare_times)
        move_median = statistics.median(m["total"] for m in moves)
        rebuild_median = statistics.median(m["rebuild"] for m in moves)
        evaluate_median = statistics.median(m["evaluate"] for m in moves)

        factors = [t for info in workspace.matrices for t in workspace.factors(info.name)]
        working = [w.buffer for w in whatif.pruner._working.values()]
        ref = evaluator._reference
        reference = [t for t in (ref.logits, ref.lse, ref.argmax, ref.nll, *ref.stage_inputs) if t is not None]
        held = {
            "model_mib": mib(tensor_bytes(runnable.module.parameters())),
            "factors_mib": mib(tensor_bytes(factors)),
            "working_copy_mib": mib(tensor_bytes(working)),
            "reference_mib": mib(tensor_bytes(reference)),
        }
    return {
        "model": name, "threads": threads, "params": sum(p.numel() for p in runnable.module.parameters()),
        "eval": batch.to_dict(), "open_s": t_open, "reference_s": t_reference, "spectra_s": t_spectra,
        "factors_s": t_factors, "bare_forward_median_s": bare_median, "bare_forward_s": bare_times,
        "move_median_s": move_median, "rebuild_median_s": rebuild_median, "evaluate_median_s": evaluate_median,
        "ratio_move_to_bare": move_median / bare_median,
        "ratio_move_minus_rebuild_to_bare": (move_median - rebuild_median) / bare_median,
        "moves": moves, "held": held, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def report(r: dict) -> str:
    h = r["held"]
    lines = [
        (f"## {r['model']}: {r['params'] / 1e6:.1f}M parameters, eval {r['eval']['sequences']}x"
        f"{r['eval']['tokens'] // r['eval']['sequences']} = {r['eval']['tokens']} positions ({r['eval']['source']}), "
        f"{r['threads']} torch threads"),
        (f"one-off: open {r['open_s']:.2f} s, reference outputs {r['reference_s']:.2f} s, singular values "
         f"{r['spectra_s']:.2f} s, SVD factors of every matrix {r['factors_s']:.2f} s"),
        f"bare forward pass (floor)        median {r['bare_forward_median_s']:.3f} s",
        (f"slider move (plan+rebuild+eval)  median {r['move_median_s']:.3f} s   "
         f"(rebuild {r['rebuild_median_s']:.3f} s, evaluate {r['evaluate_median_s']:.3f} s)"),
        (f"ratio move / bare forward        {r['ratio_move_to_bare']:.2f}x   "
         f"(move minus rebuild: {r['ratio_move_minus_rebuild_to_bare']:.2f}x)"),
        (f"peak RSS {r['peak_rss_mib']:.0f} MiB; held: model {h['model_mib']:.0f} MiB, factors "
         f"{h['factors_mib']:.0f} MiB, working copy {h['working_copy_mib']:.0f} MiB, reference outputs "
         f"{h['reference_mib']:.0f} MiB"),
        "moves: " + ", ".join(f"{m['strategy']} {m['value']:g}: {m['total']:.3f}s ({m['rebuilt']} rebuilt, "
                              f"agreement {m['agreement']:.3f})" for m in r["moves"]),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "gpt2-small", "all"], default="all")
    parser.add_argument("--moves", type=int, default=None,
                        help="slider moves timed, each beside a bare forward pass (default: 18 demo, 10 gpt2-small)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    args = parser.parse_args()
    if args.model == "all":  # one process per model, so each peak RSS is its own
        results = []
        for name in ("demo", "gpt2-small"):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                moves = [] if args.moves is None else ["--moves", str(args.moves)]
                subprocess.run([sys.executable, __file__, "--model", name, *moves, "--json", f.name], check=True,
                               env=os.environ.copy())
                results.append(json.loads(Path(f.name).read_text()))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return
    result = bench(args.model, args.moves or (18 if args.model == "demo" else 10))
    print(report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

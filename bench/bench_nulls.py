"""Honest nulls (issue 13): false-positive and detection rates of the three nulls on simulated matrices, the cost of
the permutation null, BEMA's false-positive rate with the midpoint quantile pairing, and the i.i.d. Gaussian
distribution of the diagnostics behind `null_ok` (spectral/diagnostics.py).

    python bench/bench_nulls.py                 # the README table (slow: hundreds of big matrices)
    python bench/bench_nulls.py --quick         # fewer seeds, smaller BEMA study
    python bench/bench_nulls.py --only cost     # one part: rates | cost | bema | calibrate
    python bench/bench_nulls.py --jobs 8        # seeds spread over processes (each one torch thread)

Every matrix is drawn from numpy's PCG64 with a stated seed, so the table is reproducible; only the timings depend on
the machine (and on what else runs on it).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the project's thread policy, before numpy loads (spectral/threads.py)
os.environ.setdefault("MKL_NUM_THREADS", "1")
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.rmt_oracles import simulate  # noqa: E402 - the tests' matrices, one definition

CASES = {  # name: (generator kind, rows, cols); the shapes
    "iid Gaussian": ("gauss", 1000, 2000),
    "3 planted spikes": ("spikes", 1000, 2000),
    "Gamma(4,1/4) column profile": ("colprof", 1000, 2000),
    "Gamma(4,1/4) row profile": ("rowprof", 1000, 2000),
    "Student-t df 5": ("t5", 512, 2048),
    "Student-t df 3": ("t3", 512, 2048),
}
NULLS = ("mp", "biwhitened", "permutation")


def one_matrix(kind: str, rows: int, cols: int, seed: int, shuffles: int, nulls=NULLS) -> dict:
    """n_signal and null_ok of one simulated matrix under each null (the engine's own functions)."""
    import torch

    from spectral.analysis import Settings, analyze_spectrum
    from spectral.matrices import MatrixInfo
    from spectral.workspace import matrix_spectrum, null_spectrum

    w = torch.from_numpy(simulate(kind, rows, cols, seed))
    spectrum = matrix_spectrum(w, MatrixInfo("w", (rows, cols), "other"))
    out = {}
    for null in nulls:
        sp = null_spectrum(spectrum, w, null, shuffles=shuffles, seed=seed)
        r = analyze_spectrum(sp, Settings(null=null))
        out[null] = (r.n_signal, r.null_ok)
    return out


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def rates(seeds: int, perm_seeds: int, shuffles: int, jobs: int) -> None:
    print(f"\n## P(n_signal > 0) at c = 0.99 and null_ok; permutation with {shuffles} shuffles per matrix")
    print("(planted spikes: the share of seeds where all three are found; `flagged` = null_ok false; seeds per cell "
          "in brackets: the permutation null gets all seeds on its own target, the Student-t cases, and "
          f"{perm_seeds} elsewhere)\n")
    print("| case | shape | mp | mp flagged | biwhitened | biwhitened flagged | permutation | permutation flagged |")
    print("|---|---|---|---|---|---|---|---|")
    with ProcessPoolExecutor(jobs, initializer=_worker_init) as pool:
        for label, (kind, rows, cols) in CASES.items():
            start = time.perf_counter()
            n_perm = seeds if kind.startswith("t") else min(seeds, perm_seeds)
            plan = [(seed, NULLS if seed < n_perm else ("mp", "biwhitened")) for seed in range(seeds)]
            results = list(pool.map(one_matrix, [kind] * seeds, [rows] * seeds, [cols] * seeds,
                                    [seed for seed, _ in plan], [shuffles] * seeds, [nulls for _, nulls in plan]))
            cells = []
            for null in NULLS:
                got = [r[null] for r in results if null in r]
                counts = np.array([n for n, _ in got])
                flagged = np.mean([not ok for _, ok in got])
                rate = np.mean(counts >= 3) if kind == "spikes" else np.mean(counts > 0)
                what = "found all 3" if kind == "spikes" else f"mean n {counts.mean():.1f}"
                cells += [f"{rate:.1%} ({what}) [{len(got)}]", f"{flagged:.0%}"]
            print(f"| {label} | {rows}×{cols} | " + " | ".join(cells) + f" |  <!-- {time.perf_counter() - start:.0f} s -->",
                  flush=True)


def cost(shuffles: int) -> None:
    import torch

    from spectral.nulls import biwhitened_spectrum, permutation_null
    from spectral.spectra import singular_values
    from spectral.threads import configure_threads

    configure_threads()
    w = torch.from_numpy(simulate("gauss", 768, 3072, 0))
    s = singular_values(w)

    def best(fn, repeats=3) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    svdvals = best(lambda: torch.linalg.svdvals(w))
    gram = best(lambda: singular_values(w))
    perm = best(lambda: permutation_null(w, s, shuffles=shuffles), repeats=1)
    biw = best(lambda: biwhitened_spectrum(w), repeats=1)
    print(f"\n## Cost on 768×3072 float64 ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)\n")
    print(f"- one torch.linalg.svdvals: {svdvals:.3f} s; our singular values (Gram route): {gram:.3f} s")
    print(f"- permutation null, {shuffles} shuffles: {perm:.2f} s = {perm / svdvals:.1f}x svdvals "
          f"({perm / gram:.0f}x the Gram route)")
    print(f"- biwhitened spectrum (Sinkhorn + one spectrum): {biw:.3f} s = {biw / svdvals:.2f}x svdvals")


def _bema_false_positives(rows: int, cols: int, seed: int) -> tuple[int, int]:
    """(new pairing signal count, old k/M pairing signal count) on pure noise at c = 0.99."""
    from spectral.mp import mp_quantiles, upper_threshold
    from spectral.noise import BEMA

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols))
    big, small = max(rows, cols), min(rows, cols)
    gram = w @ w.T if rows <= cols else w.T @ w
    lam = np.clip(np.linalg.eigvalsh(gram), 0, None)[::-1] / big
    new = BEMA().fit(np.sqrt(lam * big), (rows, cols)).sigma2_
    k = np.arange(math.ceil(0.2 * small), math.floor(0.8 * small) + 1)
    quantiles = mp_quantiles(small / big, 1.0 - k / small)
    old = float(quantiles @ lam[k - 1]) / float(quantiles @ quantiles)
    return tuple(int(np.count_nonzero(lam > upper_threshold(big, small, s2, 0.99))) for s2 in (new, old))


def bema(seeds: int, jobs: int) -> None:
    shapes = [(100, 400), (200, 800), (300, 300), (500, 1000), (1000, 2000)]
    print(f"\n## BEMA false-positive rate P(n_signal > 0) on i.i.d. Gaussian noise at c = 0.99, {seeds} seeds")
    print("(midpoint pairing (k − ½)/M against Ke-Ma-Lin's k/M; binomial standard error in brackets)\n")
    print("| shape | (k − ½)/M | k/M |")
    print("|---|---|---|")
    with ProcessPoolExecutor(jobs, initializer=_worker_init) as pool:
        for rows, cols in shapes:
            n = seeds if rows * cols <= 400_000 else max(seeds // 5, 200)
            out = np.array(list(pool.map(_bema_false_positives, [rows] * n, [cols] * n, range(n), chunksize=50)))
            cells = []
            for col in (0, 1):
                p = float(np.mean(out[:, col] > 0))
                cells.append(f"{p:.2%} (±{math.sqrt(p * (1 - p) / n):.2%})")
            print(f"| {rows}×{cols} ({n} seeds) | " + " | ".join(cells) + " |", flush=True)


def _diagnostics(rows: int, cols: int, seed: int, spikes: bool) -> tuple[float, ...]:
    import torch

    from spectral.diagnostics import entry_statistics, spectrum_fit
    from spectral.noise import BEMA

    w = simulate("spikes" if spikes else "gauss", rows, cols, seed)
    e = entry_statistics(torch.from_numpy(w))
    big, small = max(rows, cols), min(rows, cols)
    gram = w @ w.T if rows <= cols else w.T @ w
    lam = np.clip(np.linalg.eigvalsh(gram), 0, None)[::-1] / big
    fit = spectrum_fit(lam, big, small, BEMA().fit(np.sqrt(lam * big), (rows, cols)).sigma2_)
    return (e.excess_kurtosis / math.sqrt(24 / (rows * cols)), e.row_spread, e.col_spread, fit.n_below,
            small * (fit.ks_whole - fit.frac_above))


def calibrate(seeds: int, jobs: int) -> None:
    from spectral.diagnostics import kurtosis_limit, left_outlier_limit, shape_ks_limit, spread_limit

    print(f"\n## Diagnostics under i.i.d. Gaussian noise (max over {seeds} seeds) against the null_ok limits\n")
    print("| shape | spikes | kurtosis / sd (limit) | row spread (limit) | column spread (limit) | below λ₋ (limit) "
          "| M·(KS − above) (limit) |")
    print("|---|---|---|---|---|---|---|")
    with ProcessPoolExecutor(jobs, initializer=_worker_init) as pool:
        for rows, cols in [(64, 256), (100, 100), (200, 800), (300, 300), (500, 2000), (1000, 2000)]:
            for spikes in (False, True):
                n = seeds if rows * cols <= 300_000 else max(seeds // 4, 20)
                out = np.array(list(pool.map(_diagnostics, [rows] * n, [cols] * n, range(n), [spikes] * n)))
                top = out.max(axis=0)
                small = min(rows, cols)
                print(f"| {rows}×{cols} | {'3' if spikes else '-'} | {top[0]:.1f} "
                      f"({kurtosis_limit(rows, cols) / math.sqrt(24 / (rows * cols)):.0f}) | "
                      f"{top[1]:.2f} ({spread_limit(rows):.2f}) | {top[2]:.2f} ({spread_limit(cols):.2f}) | "
                      f"{top[3]:.0f} ({left_outlier_limit(small)}) | {top[4]:.1f} ({small * shape_ks_limit(small):.1f}) |",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer seeds")
    parser.add_argument("--only", choices=["rates", "cost", "bema", "calibrate"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seeds", type=int, help="seeds per rate case (default 100, quick 20)")
    parser.add_argument("--perm-seeds", type=int, default=20,
                        help="seeds of the permutation null outside its Student-t target cases (default 20)")
    parser.add_argument("--shuffles", type=int, default=None, help="permutation shuffles (default the engine's)")
    args = parser.parse_args()
    from spectral.nulls import DEFAULT_SHUFFLES

    shuffles = args.shuffles or DEFAULT_SHUFFLES
    seeds = args.seeds or (20 if args.quick else 100)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; jobs {args.jobs}")
    if args.only in (None, "cost"):
        cost(shuffles)
    if args.only in (None, "bema"):
        bema(1000 if args.quick else 10000, args.jobs)
    if args.only in (None, "calibrate"):
        calibrate(50 if args.quick else 200, args.jobs)
    if args.only in (None, "rates"):
        rates(seeds, min(args.perm_seeds, seeds), shuffles, args.jobs)


if __name__ == "__main__":
    main()

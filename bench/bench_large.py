"""Peak memory of the analysis of a multi-GB checkpoint: near the largest matrix, not the file (issue 6, item 4).

    python bench/bench_large.py                  # 3 GB of random fp16 matrices in a temporary folder, deleted after
    python bench/bench_large.py --gigabytes 1    # quicker
    python bench/bench_large.py --dir /data      # where to write the file (needs the space; checked first)

A safetensors file is written one tensor at a time (the writer never holds the model either): one "embedding"
of 2048 x 32768 (the largest matrix, 128 MiB in fp16) and as many 512 x 32768 matrices (32 MiB each) as fill the
size, and a second file holding the largest matrix alone. Then, each in a fresh Python process, side by side:

1. `Workspace.open(path).analyze()` of the big file: every matrix read through its own memory map, one at a time,
   its singular values kept (a few KB), the matrix dropped;
2. the same analysis of the largest matrix alone: the peak RSS the big file's should equal;
3. the same reader keeping every tensor of the big file: what holding the model whole costs before any analysis.

Printed: peak RSS of each (the kernel's VmHWM), the process baseline (Python, torch, numpy imported, checkpoint
opened), and the ratios peak / file size and (peak - baseline) / largest matrix (stored bytes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
LARGEST = (2048, 32768)  # the "embedding": the largest matrix of the file
BULK = (512, 32768)  # every other matrix
MAX_GIGABYTES = 4.0


def write_safetensors(path: Path, shapes: dict[str, tuple[int, int]], seed: int = 0) -> int:
    """Random N(0, 0.02²) fp16 matrices, written tensor by tensor in the safetensors layout; returns the file size."""
    import torch

    header, offset = {}, 0
    for name, (rows, cols) in shapes.items():
        size = rows * cols * 2
        header[name] = {"dtype": "F16", "shape": [rows, cols], "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "note": "bench/bench_large.py: random fp16 matrices"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    g = torch.Generator().manual_seed(seed)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for rows, cols in shapes.values():
            w = torch.randn(rows, cols, generator=g).mul_(0.02).to(torch.float16)
            f.write(w.numpy().tobytes())
    return path.stat().st_size


# Peak RSS is the kernel's high-water mark of this process's own memory (VmHWM), which starts afresh at exec
# (getrusage's ru_maxrss would carry over the parent's peak from before the fork).
PEAK = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

ANALYZE = PEAK + """
import json, sys, time
from spectral.checkpoint import load_checkpoint
from spectral.workspace import Workspace
ws = Workspace(load_checkpoint(sys.argv[1]))  # header read and sha256 streamed: no tensor data held
base = hwm()
t0 = time.perf_counter()
analysis = ws.analyze()
seconds = time.perf_counter() - t0
print(json.dumps({"base": base, "peak": hwm(), "seconds": seconds, "matrices": len(analysis.matrices)}))
"""

LOAD_WHOLE = PEAK + """
import json, sys, time
from spectral.checkpoint import load_checkpoint
ckpt = load_checkpoint(sys.argv[1])
base = hwm()
t0 = time.perf_counter()
tensors = {name: ckpt.tensor(name).clone() for name in ckpt.names()}  # read (not just mapped), all kept
seconds = time.perf_counter() - t0
print(json.dumps({"base": base, "peak": hwm(), "seconds": seconds, "matrices": len(tensors)}))
"""


def measure(script: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=3.0, help=f"file size (at most {MAX_GIGABYTES:g})")
    parser.add_argument("--dir", default=None, help="where to write the file (default: the system temp folder)")
    args = parser.parse_args()
    if not 0.2 <= args.gigabytes <= MAX_GIGABYTES:
        parser.error(f"--gigabytes must be between 0.2 and {MAX_GIGABYTES:g}")
    target = int(args.gigabytes * 1e9)
    bulk_bytes = BULK[0] * BULK[1] * 2
    largest_bytes = LARGEST[0] * LARGEST[1] * 2
    n_bulk = max(1, math.ceil((target - largest_bytes) / bulk_bytes))
    shapes = {"model.embed_tokens.weight": LARGEST}
    shapes |= {f"model.layers.{i}.mlp.down_proj.weight": BULK for i in range(n_bulk)}

    parent = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    need = largest_bytes + n_bulk * bulk_bytes + 512 * MiB
    if free < need:
        sys.exit(f"bench_large: {parent} has {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed")
    folder = Path(tempfile.mkdtemp(prefix="spectra-large-", dir=parent))
    try:
        path = folder / "large.safetensors"
        t0 = time.perf_counter()
        size = write_safetensors(path, shapes)
        print(f"wrote {path.name}: {size / 1e9:.2f} GB, {len(shapes)} fp16 matrices (largest {LARGEST[0]} x "
              f"{LARGEST[1]} = {largest_bytes / MiB:.0f} MiB, then {n_bulk} of {BULK[0]} x {BULK[1]}) in "
              f"{time.perf_counter() - t0:.1f} s; {free / 1e9:.0f} GB were free")
        alone = folder / "largest.safetensors"
        write_safetensors(alone, {"model.embed_tokens.weight": LARGEST})
        ours = measure(ANALYZE, path)
        single = measure(ANALYZE, alone)
        whole = measure(LOAD_WHOLE, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    per_file = f"peak/{size / 1e9:.1f}GB"
    print(f"{'':40s}{'peak RSS':>10s}{'baseline':>10s}{per_file:>11s}{'(peak-base)/largest':>21s}{'seconds':>9s}")
    rows = (("analysis of the file, tensor by tensor", ours), ("analysis of the largest matrix alone", single),
            ("every tensor kept (whole model)", whole))
    for label, r in rows:
        print(f"{label:40s}{r['peak'] / MiB:8.0f} M{r['base'] / MiB:8.0f} M{r['peak'] / size:11.3f}"
              f"{(r['peak'] - r['base']) / largest_bytes:21.2f}{r['seconds']:9.1f}")
    print(f"analysis peak: file / largest matrix alone = {ours['peak'] / single['peak']:.3f}, file / whole model = "
          f"{ours['peak'] / whole['peak']:.3f}; {ours['matrices']} matrices "
          f"analysed; (peak - baseline) is {(ours['peak'] - ours['base']) / largest_bytes:.1f}x the largest matrix's "
          "stored bytes: its float32 view and float64 copy for the Gram route (4 + 8 bytes per fp16 element of 2), "
          "briefly the fp16 read too")
    print(f"file deleted: {not folder.exists()}")


if __name__ == "__main__":
    main()

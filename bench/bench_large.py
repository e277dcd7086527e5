"""Peak memory and progress of the analysis of a multi-GB checkpoint (issue 6 item 4, issue 17 item 6).

    python bench/bench_large.py                       # issue 17's 2 GiB file: one 8192x16384 + three 2048x65536 fp32
    python bench/bench_large.py --layout many-fp16    # README's 3 GB of fp16 matrices, largest 2048x32768
    python bench/bench_large.py --layout many-fp16 --gigabytes 1    # quicker
    python bench/bench_large.py --dir /data           # where to write the file (needs the space; checked first)

The file is written one tensor at a time into a temporary folder (deleted after). Then, each in a fresh Python
process (the kernel's VmHWM is that process's own peak):

1. `Workspace(load_checkpoint(path)).analyze()`: every matrix read once (pread, one copy), its singular values kept
   (a few KB), the matrix dropped; the whole analysis the CLI and the app run;
2. the spectra alone, matrix by matrix through `singular_values(matrix, progress=...)`: the longest wait between two
   progress calls (what a progress bar fed by it would show), and the peak;
3. the largest matrix alone, analysed: the floor the whole file's peak should sit on;
4. every tensor of the file held at once (no analysis): what holding the model costs.

Printed: peak RSS of each, its ratio to the file size, and (peak - baseline) / largest matrix's stored bytes, where
the baseline is the process after imports and opening the checkpoint. Which layouts reach a small peak/file ratio:
peak ≈ baseline + largest matrix (as read) + its float32 view if stored in 16 bits + the M×M float64 Gram matrix and
the eigensolver's copy of it (M the short side) + one 32 MiB slice; so peak/file is small when the file is many
matrices none of which is a large part of it, and near 1 when one matrix is a quarter of the file and square-ish.
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
os.environ["SPECTRA_CACHE"] = "off"  # measure the work itself, not the disk cache (children inherit it)
MiB = 1 << 20
MAX_GIGABYTES = 4.0
LAYOUTS = {
    # issue 17 item 6: 2 GiB, one square-ish matrix a quarter of the file
    "issue17": {"dtype": "F32", "largest": (8192, 16384), "bulk": (2048, 65536), "n_bulk": 3},
    # README's large-file row: many 16-bit matrices, the largest 128 MiB
    "many-fp16": {"dtype": "F16", "largest": (2048, 32768), "bulk": (512, 32768), "n_bulk": None},
}
BYTES = {"F32": 4, "F16": 2}


def write_safetensors(path: Path, shapes: dict[str, tuple[int, int]], dtype: str, seed: int = 0) -> int:
    """Random N(0, 0.02²) matrices, written tensor by tensor in the safetensors layout; returns the file size."""
    import torch

    header, offset = {}, 0
    for name, (rows, cols) in shapes.items():
        size = rows * cols * BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": [rows, cols], "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "note": "bench/bench_large.py: random matrices"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    g = torch.Generator().manual_seed(seed)
    torch_dtype = {"F32": torch.float32, "F16": torch.float16}[dtype]
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for rows, cols in shapes.values():
            for begin in range(0, rows, 1024):  # a block of rows at a time: the writer never holds a whole matrix
                w = torch.randn(min(1024, rows - begin), cols, generator=g).mul_(0.02).to(torch_dtype)
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

SPECTRA = PEAK + """
import json, sys, time
from spectral.checkpoint import load_checkpoint
from spectral.matrices import find_matrices, matrix_view
from spectral.spectra import singular_values
from spectral.threads import configure_threads
configure_threads()
ckpt = load_checkpoint(sys.argv[1])
base = hwm()
calls = [time.perf_counter()]
t0 = calls[0]
for info in find_matrices(ckpt):
    w = matrix_view(ckpt.tensor(info.name), info)
    calls.append(time.perf_counter())  # the workspace reports each matrix as it starts
    singular_values(w, progress=lambda fraction: calls.append(time.perf_counter()))
    del w
seconds = time.perf_counter() - t0
gap = max(b - a for a, b in zip(calls, calls[1:]))
print(json.dumps({"base": base, "peak": hwm(), "seconds": seconds, "matrices": len(find_matrices(ckpt)),
                  "gap": gap, "calls": len(calls)}))
"""

LOAD_WHOLE = PEAK + """
import json, sys, time
from spectral.checkpoint import load_checkpoint
ckpt = load_checkpoint(sys.argv[1])
base = hwm()
t0 = time.perf_counter()
tensors = {name: ckpt.tensor(name) for name in ckpt.names()}  # read, all kept
seconds = time.perf_counter() - t0
print(json.dumps({"base": base, "peak": hwm(), "seconds": seconds, "matrices": len(tensors)}))
"""


def measure(script: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shapes_for(layout: str, gigabytes: float) -> tuple[dict[str, tuple[int, int]], str]:
    spec = LAYOUTS[layout]
    per = BYTES[spec["dtype"]]
    n_bulk = spec["n_bulk"]
    if n_bulk is None:  # fill the requested size
        largest_bytes = math.prod(spec["largest"]) * per
        n_bulk = max(1, math.ceil((gigabytes * 1e9 - largest_bytes) / (math.prod(spec["bulk"]) * per)))
    shapes = {"model.embed_tokens.weight": spec["largest"]}
    shapes |= {f"model.layers.{i}.mlp.down_proj.weight": spec["bulk"] for i in range(n_bulk)}
    return shapes, spec["dtype"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="issue17")
    parser.add_argument("--gigabytes", type=float, default=3.0,
                        help=f"file size for many-fp16 (at most {MAX_GIGABYTES:g}); issue17 is always 2 GiB")
    parser.add_argument("--dir", default=None, help="where to write the file (default: the system temp folder)")
    parser.add_argument("--skip-whole", action="store_true", help="do not measure holding every tensor")
    args = parser.parse_args()
    if not 0.2 <= args.gigabytes <= MAX_GIGABYTES:
        parser.error(f"--gigabytes must be between 0.2 and {MAX_GIGABYTES:g}")
    shapes, dtype = shapes_for(args.layout, args.gigabytes)
    per = BYTES[dtype]
    largest = max(shapes.values(), key=math.prod)
    largest_bytes = math.prod(largest) * per
    need = sum(math.prod(s) * per for s in shapes.values()) + largest_bytes + 512 * MiB

    parent = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < need:
        sys.exit(f"bench_large: {parent} has {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed")
    folder = Path(tempfile.mkdtemp(prefix="spectra-large-", dir=parent))
    try:
        path = folder / "large.safetensors"
        t0 = time.perf_counter()
        size = write_safetensors(path, shapes, dtype)
        print(f"wrote {path.name}: {size / 2 ** 30:.2f} GiB ({size / 1e9:.2f} GB), {len(shapes)} {dtype} matrices "
              f"(largest {largest[0]} x {largest[1]} = {largest_bytes / MiB:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s; {free / 1e9:.0f} GB were free")
        alone = folder / "largest.safetensors"
        write_safetensors(alone, {"model.embed_tokens.weight": largest}, dtype)
        rows = [("analyze(): the file, matrix by matrix", measure(ANALYZE, path)),
                ("spectra with progress, matrix by matrix", measure(SPECTRA, path)),
                ("analyze(): the largest matrix alone", measure(ANALYZE, alone))]
        if not args.skip_whole:
            rows.append(("every tensor held (no analysis)", measure(LOAD_WHOLE, path)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{'':42s}{'peak RSS':>10s}{'baseline':>10s}{'peak/file':>11s}{'(peak-base)/largest':>21s}{'seconds':>9s}")
    for label, r in rows:
        print(f"{label:42s}{r['peak'] / MiB:8.0f} M{r['base'] / MiB:8.0f} M{r['peak'] / size:11.3f}"
              f"{(r['peak'] - r['base']) / largest_bytes:21.2f}{r['seconds']:9.1f}")
    spectra = rows[1][1]
    print(f"progress: {spectra['calls']} calls, longest wait between two {spectra['gap']:.1f} s")
    print(f"analysis peak / file = {rows[0][1]['peak'] / size:.3f}; / largest matrix alone = "
          f"{rows[0][1]['peak'] / rows[2][1]['peak']:.3f}; {rows[0][1]['matrices']} matrices analysed")
    print(f"file deleted: {not folder.exists()}")


if __name__ == "__main__":
    main()

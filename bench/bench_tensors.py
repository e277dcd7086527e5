"""Many tensors in one file (issue 17 item 4): open once, read many; and where the tensor bound refuses.

    python bench/bench_tensors.py                  # 4,000 and 20,000 tensors; 100,000 (the bound) and 600,000 headers
    python bench/bench_tensors.py --quick          # 4,000 only, and the 600,000 refusal
    python bench/bench_tensors.py --baseline       # also the old way: a fresh safe_open per tensor read (quadratic)

For each count N, a safetensors file of N small float32 matrices (32 x 64, 8 KiB each) is written to a temporary
folder; then, in this process: `load_checkpoint` (header validated, the library's own check, sha256), every tensor
read once through `Checkpoint.tensor`, and for 4,000 tensors the whole `Workspace.analyze()` (spectra and every
fit of every matrix, which is the analysis's cost, not the reader's). The same counts as a PyTorch zip (torch.save):
`load_checkpoint` runs the pickle's dry run, then torch.load. A 600,000-tensor header is over MAX_TENSORS
(100,000, SPECTRA_MAX_TENSORS) and must be refused before it is parsed.

Timings are wall-clock seconds on whatever else the machine is doing; rerun on a quiet machine for the README.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ["SPECTRA_CACHE"] = "off"  # measure the work itself, not the disk cache (children inherit it)
sys.path.insert(0, str(ROOT))

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spectral import checkpoint as ck
from spectral.checkpoint import CheckpointError, load_checkpoint
from spectral.threads import configure_threads
from spectral.workspace import Workspace

SHAPE = (32, 64)
ANALYSE_AT_MOST = 4_000  # the target: 4,000 tensors analysed in <= 10 s


def state(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{i // 8}.mlp.w{i % 8}.weight": torch.randn(*SHAPE, generator=g).mul_(0.02)
            for i in range(n)}


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_safetensors(folder: Path, n: int, baseline: bool) -> dict:
    path = folder / f"{n}.safetensors"
    save_file(state(n), str(path))
    ckpt, load_s = timed(lambda: load_checkpoint(path))
    _, read_s = timed(lambda: [ckpt.tensor(name) for name in ckpt.names()])
    row = {"format": "safetensors", "tensors": n, "MB": path.stat().st_size / 1e6, "load": load_s, "read all": read_s}
    if n <= ANALYSE_AT_MOST:
        _, row["analyze"] = timed(lambda: Workspace(ckpt).analyze())
    if baseline:
        def old_way():  # what the reader did before: a fresh safe_open (header re-parsed) per tensor
            for name in ckpt.names():
                with safe_open(str(path), framework="pt") as f:
                    f.get_tensor(name)
        _, row["old read all"] = timed(old_way)
    path.unlink()
    return row


def bench_pytorch(folder: Path, n: int) -> dict:
    path = folder / f"{n}.pt"
    torch.save(state(n), path)
    ckpt, load_s = timed(lambda: load_checkpoint(path))
    _, read_s = timed(lambda: [ckpt.tensor(name) for name in ckpt.names()])
    row = {"format": "pytorch", "tensors": n, "MB": path.stat().st_size / 1e6, "load": load_s, "read all": read_s}
    path.unlink()
    return row


def bench_refusal(folder: Path, n: int) -> dict:
    """A header of `n` zero-size tensors (no data at all): over the bound, refused before its JSON is parsed."""
    path = folder / f"{n}-header.safetensors"
    header = "{" + ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n)) + "}"
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    start = time.perf_counter()
    try:
        load_checkpoint(path)
        outcome = "loaded"
    except CheckpointError as error:
        outcome = error.problem
    row = {"format": "safetensors header", "tensors": n, "MB": path.stat().st_size / 1e6,
           "load": time.perf_counter() - start, "outcome": outcome}
    path.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4,000 tensors and the 600,000 refusal only")
    parser.add_argument("--baseline", action="store_true", help="also time the old per-read safe_open")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    configure_threads()
    counts = [4_000] if args.quick else [4_000, 20_000, ck.MAX_TENSORS]
    folder = Path(tempfile.mkdtemp(prefix="spectra-tensors-"))
    rows = []
    try:
        for n in counts:
            rows.append(bench_safetensors(folder, n, args.baseline and n <= 20_000))
            rows.append(bench_pytorch(folder, n))
        rows.append(bench_refusal(folder, 600_000))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    columns = ["load", "read all", "analyze", "old read all"]
    print(f"{'format':20s}{'tensors':>9s}{'MB':>8s}" + "".join(f"{c:>14s}" for c in columns))
    for row in rows:
        cells = "".join(f"{row[c]:13.2f}s" if c in row else f"{'':14s}" for c in columns)
        print(f"{row['format']:20s}{row['tensors']:9,d}{row['MB']:8.1f}{cells}")
        if "outcome" in row:
            print(f"{'':37s}-> {row['outcome']}")
    print(f"bound: MAX_TENSORS = {ck.MAX_TENSORS:,} per checkpoint (SPECTRA_MAX_TENSORS); timings share the machine "
          "with whatever else runs")


if __name__ == "__main__":
    main()

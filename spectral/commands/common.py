"""Helpers shared by the subcommands: the checkpoint argument, a stderr progress bar, writing outputs."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from spectral.devices import (
    CPU,
    DEVICES,
    Device,
    DeviceError,
    device_note,
    resolve_device,
)
from spectral.distributed import DistributedError, RayMap


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2)."""


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a .safetensors/.pt/.pth/.bin file, a Hugging Face folder, or the word 'demo'")


def add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    """`--ray [ADDRESS]` and `--device` for every command that computes spectra (issue 14)."""
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="compute the spectra as tasks on a Ray cluster: host:port or ray://host:port, 'local' "
                             "for a throwaway cluster on this machine; without ADDRESS, $RAY_ADDRESS "
                             '(needs pip install "ray[default]")')
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where singular values and forward passes run: cpu (default; float64 spectra), cuda, "
                             "or auto (cuda when present); on GPUs without full-rate FP64 the spectra are float32 "
                             "and not cached")


@dataclass(frozen=True)
class Compute:
    """Where a command's work runs: the Ray map (None: here) and the local device."""

    mapper: RayMap | None
    device: Device

    def describe(self) -> str:
        return self.mapper.describe() if self.mapper is not None else f"this machine, {self.device.describe()}"


@contextmanager
def compute_of(args: argparse.Namespace) -> Iterator[Compute]:
    """The Ray map and device the options ask for, closed (a local cluster stopped) when the command ends; a cluster
    that cannot be reached or a device that is absent is a usage error."""
    try:
        device = resolve_device(getattr(args, "device", "cpu"))
        ray = getattr(args, "ray", None)
        mapper = None if ray is None else RayMap(ray or None, device=getattr(args, "device", "cpu"))
    except (DeviceError, DistributedError) as e:
        raise UsageError(str(e)) from None
    try:
        yield Compute(mapper, device)
    finally:
        if mapper is not None:
            mapper.close()


LOCAL = Compute(None, CPU)


def note_precision(compute: Compute, workspace) -> None:
    """On a device without full-rate float64, say so on stderr with the error float32 was measured to add on the
    checkpoint's first finite matrix (against the float64 CPU route), so every number after it has its precision."""
    if compute.mapper is not None or compute.device.dtype == torch.float64:
        return
    sample = next((w for w in (workspace.weight(m.name) for m in workspace.matrices) if bool(torch.isfinite(w).all())),
                  None)  # the first finite matrix (a NaN one has no spectrum to compare)
    print(f"note: spectra on {device_note(compute.device, sample)}", file=sys.stderr)


def probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (confidence) or in (0, 1] (energy)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


class StderrProgress:
    """A tqdm bar on stderr fed by the engine's progress(i, total, label) callbacks. It appears only on a terminal
    and only once the work has taken more than a second, so short runs and pipes stay clean."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None

    def __call__(self, i: int, total: int, label: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, file=sys.stderr, unit="matrix", leave=False,
                            disable=None, delay=1.0, mininterval=0.5)
        self.bar.n = i
        self.bar.set_postfix_str(label[-40:], refresh=False)
        self.bar.refresh()
        if i >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_text(path: str | None, text: str) -> None:
    """Write to PATH, or stdout when PATH is None or '-'."""
    if path in (None, "-"):
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        Path(path).write_text(text)

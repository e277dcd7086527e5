"""Where the singular values are computed: `--device cpu|cuda|auto` for every spectra-computing command.

CPU is the reference route of `spectral.spectra.singular_values` (float64 Gram eigenvalues, SVD fallback; RMT.md §8).
On a CUDA GPU the same route runs in float64 where the chip has full-rate FP64 (data-centre parts: P100, V100,
A100, H100/H200, B100/B200); consumer and workstation GPUs run FP64 at 1/32-1/64 of FP32, so there the singular
values come from a float32 SVD (`torch.linalg.svdvals`; not the Gram route, which squares the condition number and
would lose every singular value below ~3e-4·s_max in float32), and `float32_error` measures what that costs against
float64 on a real matrix so the caller can state it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spectral.spectra import GRAM_SAFE_RATIO, singular_values

DEVICES = ("auto", "cpu", "cuda")
# CUDA compute capabilities whose FP64 rate is at least half of FP32 (NVIDIA's per-architecture throughput tables)
FULL_RATE_FP64 = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


class DeviceError(ValueError):
    """A device that cannot be used here; `str(error)` is one line the user can act on."""


@dataclass(frozen=True)
class Device:
    """A resolved compute device for singular values: kind, the float type the route runs in, and its name."""

    kind: str  # "cpu" or "cuda"
    dtype: torch.dtype  # torch.float64, or torch.float32 on GPUs without full-rate FP64
    name: str  # "CPU", or the GPU's name as CUDA reports it
    index: int = 0  # CUDA device index

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind if self.kind == "cpu" else f"cuda:{self.index}")

    @property
    def precision(self) -> str:
        return "float64" if self.dtype == torch.float64 else "float32"

    def describe(self) -> str:
        """One line for the CLI and the Overview card, e.g. "cuda:0 (NVIDIA H100 80GB HBM3, float64)"."""
        where = "cpu" if self.kind == "cpu" else f"cuda:{self.index}"
        return f"{where} ({self.name}, {self.precision})"


CPU = Device("cpu", torch.float64, "CPU")


def resolve_device(requested: str = "auto") -> Device:
    """`auto`: the first CUDA GPU when torch sees one, else the CPU; `cuda`: the GPU or a DeviceError; `cpu`: the CPU."""
    wanted = str(requested).strip().lower()
    if wanted not in DEVICES:
        raise DeviceError(f"unknown device {requested!r}: choose one of {', '.join(DEVICES)}")
    if wanted == "cpu":
        return CPU
    if not torch.cuda.is_available():
        if wanted == "auto":
            return CPU
        built = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise DeviceError(f"--device cuda: no CUDA GPU available ({built}, torch {torch.__version__}); "
                          "use --device cpu or --device auto")
    index = torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    dtype = torch.float64 if tuple(capability) in FULL_RATE_FP64 else torch.float32
    return Device("cuda", dtype, torch.cuda.get_device_name(index), index)


def singular_values_on(matrix: torch.Tensor, device: Device = CPU) -> np.ndarray:
    """Singular values of a 2-D matrix, descending, as float64 numpy, computed on `device` in its precision.

    On the CPU in float64 this is exactly `spectral.spectra.singular_values` (the local run's route)."""
    if device == CPU:
        return singular_values(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    w = matrix.detach().to(device=device.torch_device, dtype=device.dtype)
    if device.dtype != torch.float64:
        s = torch.linalg.svdvals(w)
        return s.to(device="cpu", dtype=torch.float64).numpy()
    m, n = w.shape  # the float64 Gram route of spectral.spectra, on this device (RMT.md §8)
    gram = w @ w.T if m <= n else w.T @ w
    eig = torch.linalg.eigvalsh(gram).cpu().numpy()[::-1]
    s = np.sqrt(np.clip(eig, 0.0, None))
    if s.size and s[0] > 0 and s[-1] < GRAM_SAFE_RATIO * s[0]:
        return torch.linalg.svdvals(w).cpu().numpy()
    return np.ascontiguousarray(s)


def float32_error(matrix: torch.Tensor, device: Device) -> float:
    """max_i |s_i(device) - s_i(float64 CPU)| / s_1 for one matrix: the error a float32 device adds, to be stated."""
    reference = singular_values(matrix)
    if reference.size == 0 or reference[0] == 0:
        return 0.0
    return float(np.max(np.abs(singular_values_on(matrix, device) - reference)) / reference[0])


def device_note(device: Device, sample: torch.Tensor | None = None) -> str:
    """The line the CLI prints and the Overview card shows: the device, and for a float32 device the error it was
    measured to add on `sample` (a matrix of the checkpoint) against the float64 CPU route."""
    if device.dtype == torch.float64 or sample is None:
        return device.describe()
    return (f"{device.describe()}: float32 singular values, measured max |Δs|/s_max = {float32_error(sample, device):.1e} "
            "against float64 on one matrix")

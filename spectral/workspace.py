"""One cached object per loaded checkpoint: its matrices, their spectra and SVD factors, computed once each.

The dashboard keeps one `Workspace` per checkpoint content (sha256) and shares it read-only across browser sessions;
the CLI makes one per run. Nothing here mutates the checkpoint's tensors.
"""
from __future__ import annotations

import dataclasses
import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from spectral.analysis import (
    Analysis,
    Progress,
    Settings,
    Spectrum,
    analyze_spectrum,
    summarize,
)
from spectral.checkpoint import Checkpoint, load_checkpoint
from spectral.diagnostics import entry_statistics
from spectral.matrices import MatrixInfo, find_matrices, matrix_view
from spectral.nulls import DEFAULT_SHUFFLES, NULLS, biwhitened_spectrum, permutation_null
from spectral.spectra import singular_values
from spectral.threads import configure_threads

Fraction = Callable[[float], None]  # progress within one matrix, 0..1


class NonFiniteMatrix(ValueError):
    """A matrix with NaN or Inf entries: it has no spectrum and is skipped; `str(error)` is the reason."""


def _takes_progress(fn) -> bool:
    try:
        return "progress" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_SINGULAR_VALUES_TAKE_PROGRESS = _takes_progress(singular_values)


def check_finite(matrix: torch.Tensor) -> None:
    """Raise `NonFiniteMatrix` with the count when the matrix holds NaN or Inf."""
    if not bool(torch.isfinite(matrix).all()):
        bad = int((~torch.isfinite(matrix)).sum())
        raise NonFiniteMatrix(f"{bad} NaN/Inf values: matrix skipped")


def matrix_spectrum(matrix: torch.Tensor, info: MatrixInfo, *,
                    svd: Callable[[torch.Tensor], np.ndarray] | None = None,
                    progress: Fraction | None = None) -> Spectrum:
    """The per-matrix work of `Workspace.spectra`, pure: float64 singular values (spectral.spectra, or `svd` for
    another device) and the entry statistics of the diagnostics (one O(mn) pass). Raises `NonFiniteMatrix`.
    A distributed map calls this on workers and gets exactly what the local run gets."""
    check_finite(matrix)
    w = matrix.detach()
    if svd is not None:
        s = svd(w)
    elif progress is not None and _SINGULAR_VALUES_TAKE_PROGRESS:
        s = singular_values(w, progress=progress)
    else:
        s = singular_values(w)
    # entry statistics convert slices to float64 one at a time, like the Gram product: no float64 copy of W
    return Spectrum(info.name, tuple(info.shape), info.role, tuple(info.tied_with), s, entries=entry_statistics(w))


def null_spectrum(spectrum: Spectrum, matrix: torch.Tensor, null: str, *, shuffles: int = DEFAULT_SHUFFLES,
                  seed: int = 0, progress: Fraction | None = None) -> Spectrum:
    """`spectrum` with what `null` needs added (a new object; the argument is not modified): the biwhitened
    spectrum of D₁WD₂ or the permutation null of W (spectral.nulls). Pure, like `matrix_spectrum`."""
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; choose one of {', '.join(NULLS)}")
    if null == "biwhitened" and spectrum.biwhitened is None:
        return dataclasses.replace(spectrum, biwhitened=biwhitened_spectrum(matrix, progress=progress))
    if null == "permutation" and spectrum.permutation is None:
        return dataclasses.replace(spectrum, permutation=permutation_null(
            matrix, spectrum.singular_values, shuffles=shuffles, seed=seed, progress=progress))
    return spectrum


class Workspace:
    """Matrices, spectra (singular values) and SVD factors of one checkpoint, each computed at most once."""

    def __init__(self, checkpoint: Checkpoint):
        configure_threads()
        self.checkpoint = checkpoint
        self.matrices: list[MatrixInfo] = find_matrices(checkpoint)
        self._by_name = {}
        for info in self.matrices:
            self._by_name[info.name] = info
            for alias in info.tied_with:
                self._by_name.setdefault(alias, info)
        self._spectra: dict[str, Spectrum] = {}
        self._skipped: dict[str, str] = {}
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._analyses: OrderedDict[Settings, Analysis] = OrderedDict()
        self._lock = threading.RLock()

    @classmethod
    def open(cls, source) -> Workspace:
        """A workspace for a `Checkpoint`, a path or the word "demo"."""
        if isinstance(source, Workspace):
            return source
        if not isinstance(source, Checkpoint):
            source = load_checkpoint(str(source) if isinstance(source, Path) else source)
        return cls(source)

    def info(self, name: str) -> MatrixInfo:
        """The matrix called `name` (or tied to it)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no weight matrix named {name!r} in {self.checkpoint.source}") from None

    def weight(self, name: str) -> torch.Tensor:
        """The matrix as analysed (2-D, rows × cols), in its stored dtype; a fresh view, never cached."""
        info = self.info(name)
        return matrix_view(self.checkpoint.tensor(info.name), info)

    def spectra(self, progress: Progress | None = None) -> dict[str, Spectrum]:
        """Singular values of every finite matrix, computed once; matrices with NaN/Inf are skipped with a reason."""
        with self._lock:
            todo = [m for m in self.matrices if m.name not in self._spectra and m.name not in self._skipped]
            for i, info in enumerate(todo):
                if progress:
                    progress(i, len(todo), info.name)
                try:
                    spectrum = matrix_spectrum(self.weight(info.name), info, progress=_within(progress, i, len(todo),
                                                                                              info.name))
                except NonFiniteMatrix as e:
                    self._skipped[info.name] = str(e)
                    continue
                quant, quant_sigma = self._quantization(info)
                self._spectra[info.name] = dataclasses.replace(spectrum, quant=quant, quant_sigma=quant_sigma)
            if progress and todo:
                progress(len(todo), len(todo), "")
            return {m.name: self._spectra[m.name] for m in self.matrices if m.name in self._spectra}

    def _quantization(self, info: MatrixInfo) -> tuple[str | None, float | None]:
        """(GGUF quantisation type, the σ it adds) of the stored tensor, from `Checkpoint.quantization` if present."""
        table = getattr(self.checkpoint, "quantization", None) or {}
        for name in (info.name, *info.tied_with):
            if name in table:
                kind, sigma = table[name]
                return str(kind), (float(sigma) if sigma is not None else None)
        return None, None

    def null_spectra(self, null: str, progress: Progress | None = None) -> dict[str, Spectrum]:
        """`spectra()` with what `null` needs added to each (biwhitened spectrum or permutation null, each computed
        once per matrix and cached like the spectra; `mp` needs nothing)."""
        spectra = self.spectra(progress)
        if null == "mp":
            return spectra
        with self._lock:
            todo = [name for name, sp in spectra.items()
                    if (sp.biwhitened if null == "biwhitened" else sp.permutation) is None]
            for i, name in enumerate(todo):
                if progress:
                    progress(i, len(todo), f"{null} null: {name}")
                self._spectra[name] = null_spectrum(self._spectra[name], self.weight(name), null,
                                                    progress=_within(progress, i, len(todo), name))
            if progress and todo:
                progress(len(todo), len(todo), "")
            return {m.name: self._spectra[m.name] for m in self.matrices if m.name in self._spectra}

    @property
    def skipped(self) -> list[dict]:
        """Matrices left out of the analysis, with the reason (e.g. NaN weights)."""
        return [{"name": k, "reason": v} for k, v in self._skipped.items()]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full economy SVD (U, S, Vh) in float32 of one matrix, computed lazily once; for rebuilding cut matrices."""
        info = self.info(name)
        with self._lock:
            if info.name not in self._factors:
                w = self.weight(info.name).to(torch.float64)
                U, S, Vh = torch.linalg.svd(w, full_matrices=False)
                self._factors[info.name] = (U.float().contiguous(), S.float(), Vh.float().contiguous())
            return self._factors[info.name]

    def checkpoint_summary(self) -> dict:
        ck = self.checkpoint
        return {"path": ck.source, "sha256": ck.sha256, "format": ck.format, "n_tensors": ck.n_tensors,
                "n_params": ck.n_params}

    def analyze(self, settings: Settings | None = None, progress: Progress | None = None) -> Analysis:
        """The analysis table at these settings (default `Settings()`); spectra come from the cache, so only
        arithmetic is redone (and, the first time a null other than mp is asked for, that null's spectra)."""
        settings = settings if settings is not None else Settings()
        with self._lock:
            if settings in self._analyses:
                self._analyses.move_to_end(settings)
                return self._analyses[settings]
            start = time.perf_counter()
            spectra = self.null_spectra(settings.null, progress)
            reports = [analyze_spectrum(sp, settings) for sp in spectra.values()]
            result = Analysis(self.checkpoint_summary(), settings, reports,
                              summarize(reports, time.perf_counter() - start, self.skipped))
            self._analyses[settings] = result
            while len(self._analyses) > 16:
                self._analyses.popitem(last=False)
            return result


def _within(progress: Progress | None, i: int, total: int, label: str) -> Fraction | None:
    """A within-matrix progress callback (0..1) reported as a fractional step of the matrix loop; None without one.
    Progress callers take an int index, so the fraction is reported in the label."""
    if progress is None:
        return None

    def report(fraction: float) -> None:
        progress(i, total, f"{label} {min(max(fraction, 0.0), 1.0):.0%}")

    return report

"""One cached object per loaded checkpoint: its matrices, their spectra and SVD factors, computed once each.

The dashboard keeps one `Workspace` per checkpoint content (sha256) and shares it read-only across browser sessions;
the CLI makes one per run. Nothing here mutates the checkpoint's tensors.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

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
from spectral.matrices import MatrixInfo, find_matrices, matrix_view
from spectral.spectra import singular_values
from spectral.threads import configure_threads


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
                w = self.weight(info.name)
                if not bool(torch.isfinite(w).all()):
                    bad = int((~torch.isfinite(w)).sum())
                    self._skipped[info.name] = f"{bad} NaN/Inf values: matrix skipped"
                    continue
                self._spectra[info.name] = Spectrum(info.name, tuple(info.shape), info.role, tuple(info.tied_with),
                                                    singular_values(w))
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

    def analyze(self, settings: Settings = Settings(), progress: Progress | None = None) -> Analysis:
        """The analysis table at these settings; spectra come from the cache, so only arithmetic is redone."""
        with self._lock:
            if settings in self._analyses:
                self._analyses.move_to_end(settings)
                return self._analyses[settings]
            start = time.perf_counter()
            spectra = self.spectra(progress)
            reports = [analyze_spectrum(sp, settings) for sp in spectra.values()]
            result = Analysis(self.checkpoint_summary(), settings, reports,
                              summarize(reports, time.perf_counter() - start, self.skipped))
            self._analyses[settings] = result
            while len(self._analyses) > 16:
                self._analyses.popitem(last=False)
            return result

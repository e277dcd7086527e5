"""One cached object per loaded checkpoint: its matrices, their spectra and SVD factors, computed once each.

The dashboard keeps one `Workspace` per checkpoint content (sha256) and shares it read-only across browser sessions;
the CLI makes one per run. Nothing here mutates the checkpoint's tensors.

Where the work runs: here, one matrix after another (on the CPU, or on a GPU through `device`), or, with a `mapper`
(spectral/distributed.py's `RayMap`), as tasks on a Ray cluster that run the same `matrix_spectrum`, so the caches
hold the same numbers either way. Spectra and truncation factors are also kept in a disk cache keyed by the
checkpoint's sha256 and the matrix name (spectral/cache.py), so reopening a checkpoint skips them.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from spectral.analysis import (
    Analysis,
    MatrixReport,
    Progress,
    Settings,
    Spectrum,
    analyze_spectrum,
    summarize,
)
from spectral.cache import DiskCache, default_cache
from spectral.checkpoint import Checkpoint, load_checkpoint
from spectral.devices import CPU, Device, singular_values_on
from spectral.diagnostics import EntryStats, entry_statistics
from spectral.factors import Factors, factors_and_singular_values
from spectral.heap import release_freed_memory
from spectral.matrices import MatrixInfo, find_matrices, matrix_view
from spectral.nulls import DEFAULT_SHUFFLES, NULLS, biwhitened_spectrum, permutation_null
from spectral.spectra import singular_values
from spectral.threads import configure_threads, map_single_threaded, worker_count

Fraction = Callable[[float], None]  # progress within one matrix, 0..1
SPECTRUM_ENTRY = "spectrum-v1"  # disk-cache kinds; bump when what is stored changes
FACTORS_ENTRY = "factors-v1"
_DEFAULT = object()


class NonFiniteMatrix(ValueError):
    """A matrix with NaN or Inf entries: it has no spectrum and is skipped; `str(error)` is the reason."""


FINITE_CHECK_ELEMENTS = 1 << 16  # entries checked at a time: small temporaries, fastest (cache-resident)


def check_finite(matrix: torch.Tensor) -> None:
    """Raise `NonFiniteMatrix` with the count when the matrix holds NaN or Inf (checked a block of rows at a time:
    `torch.isfinite` of the whole matrix would allocate ~1.8× it)."""
    step = max(1, FINITE_CHECK_ELEMENTS // max(matrix.shape[-1], 1))
    bad = 0
    for begin in range(0, matrix.shape[0], step):
        bad += int((~torch.isfinite(matrix[begin:begin + step])).sum())
    if bad:
        raise NonFiniteMatrix(f"{bad} NaN/Inf values: matrix skipped")


CONCURRENT_BYTES = 512 << 20  # what matrices computed side by side may hold at once, split evenly between workers
CONCURRENT_MIN_ENTRIES = 1 << 16  # smaller matrices run in the caller: their work is mostly Python, which holds the
# GIL, so workers only contend for it (4,000 tiny matrices took 5.1 s side by side, 2.9 s one at a time)


def working_bytes(info: MatrixInfo, itemsize: int = 4) -> int:
    """What computing one spectrum holds beside the process: the matrix as read (`itemsize` bytes an entry), the
    float64 Gram matrix and the eigensolver's copy of it (spectral/spectra.py; its float64 slices are bounded
    separately)."""
    rows, cols = info.shape
    return rows * cols * itemsize + 2 * 8 * min(rows, cols) ** 2


def concurrent_split(infos: list[MatrixInfo], workers: int, itemsize: Callable[[MatrixInfo], int] = lambda m: 4
                     ) -> tuple[list[MatrixInfo], list[MatrixInfo]]:
    """(matrices to run side by side in `workers` workers: each working set at most CONCURRENT_BYTES / workers and
    at least CONCURRENT_MIN_ENTRIES entries, largest first so the workers finish together; the rest, in their order,
    which run one at a time on every thread with progress within each matrix). With one worker everything is in the
    second list."""
    if workers <= 1:
        return [], list(infos)
    limit = CONCURRENT_BYTES // workers
    small = [m for m in infos if working_bytes(m, itemsize(m)) <= limit
             and m.shape[0] * m.shape[1] >= CONCURRENT_MIN_ENTRIES]
    names = {m.name for m in small}
    work = lambda m: min(m.shape) ** 2 * (max(m.shape) + 4 * min(m.shape))  # noqa: E731 - Gram + eigensolver
    return sorted(small, key=work, reverse=True), [m for m in infos if m.name not in names]


def matrix_spectrum(matrix: torch.Tensor, info: MatrixInfo, *,
                    svd: Callable[[torch.Tensor], np.ndarray] | None = None,
                    progress: Fraction | None = None) -> Spectrum:
    """The per-matrix work of `Workspace.spectra`, pure: float64 singular values (spectral.spectra, or `svd` for
    another device) and the entry statistics of the diagnostics (one O(mn) pass). Raises `NonFiniteMatrix`.
    A distributed map calls this on workers and gets exactly what the local run gets."""
    w = matrix.detach()
    # entry statistics convert slices to float64 one at a time, like the Gram product: no float64 copy of W. Their
    # sums are finite exactly when every entry is (float64 sums of squares of 16/32-bit floats cannot overflow), so
    # the entry-by-entry count runs only when they are not.
    entries = entry_statistics(w)
    if not math.isfinite(entries.mean_square):
        check_finite(w)
    s = svd(w) if svd is not None else singular_values(w, progress=progress)
    return Spectrum(info.name, tuple(info.shape), info.role, tuple(info.tied_with), s, entries=entries)


def null_spectrum(spectrum: Spectrum, matrix: torch.Tensor, null: str, *, shuffles: int = DEFAULT_SHUFFLES,
                  seed: int = 0, progress: Fraction | None = None) -> Spectrum:
    """`spectrum` with what `null` needs added (a new object; the argument is not modified): the biwhitened
    spectrum of D₁WD₂ or the permutation null of W (spectral.nulls). Pure, like `matrix_spectrum`."""
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; choose one of {', '.join(NULLS)}")
    if null == "biwhitened" and spectrum.biwhitened is None:
        return dataclasses.replace(spectrum, biwhitened=biwhitened_spectrum(matrix, spectrum.singular_values,
                                                                            progress=progress))
    if null == "permutation" and spectrum.permutation is None:
        return dataclasses.replace(spectrum, permutation=permutation_null(
            matrix, spectrum.singular_values, shuffles=shuffles, seed=seed, progress=progress))
    return spectrum


class Workspace:
    """Matrices, spectra (singular values) and SVD factors of one checkpoint, each computed at most once."""

    def __init__(self, checkpoint: Checkpoint, *, mapper=None, device: Device = CPU,
                 cache: DiskCache | None = _DEFAULT):
        """`mapper`: an object with `spectra(checkpoint, infos, progress) -> {name: Spectrum | reason}` (a RayMap);
        `device`: where singular values are computed locally; `cache`: the disk cache (default: $SPECTRA_CACHE's,
        None for none)."""
        configure_threads()
        self.checkpoint = checkpoint
        self.mapper = mapper
        self.device = device
        self.cache = default_cache() if cache is _DEFAULT else cache
        self.matrices: list[MatrixInfo] = find_matrices(checkpoint)
        self._by_name = {}
        for info in self.matrices:
            self._by_name[info.name] = info
            for alias in info.tied_with:
                self._by_name.setdefault(alias, info)
        self._spectra: dict[str, Spectrum] = {}
        self._skipped: dict[str, str] = {}
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._truncations: dict[str, Factors] = {}
        self._analyses: OrderedDict[Settings, Analysis] = OrderedDict()
        self._lock = threading.RLock()

    @classmethod
    def open(cls, source, *, mapper=None, device: Device = CPU) -> Workspace:
        """A workspace for a `Checkpoint`, a path or the word "demo" (a `Workspace` is returned as it is)."""
        if isinstance(source, Workspace):
            return source
        if not isinstance(source, Checkpoint):
            source = load_checkpoint(str(source) if isinstance(source, Path) else source)
        return cls(source, mapper=mapper, device=device)

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

    def itemsize(self, info: MatrixInfo) -> int:
        """Bytes per entry of the matrix as read (quantised GGUF tensors are read dequantised, as float32)."""
        dtype = self.checkpoint.dtypes.get(info.name, "float32")
        return 8 if dtype == "float64" else 2 if dtype in ("float16", "bfloat16") else 4

    def spectra(self, progress: Progress | None = None) -> dict[str, Spectrum]:
        """Singular values of every finite matrix, computed once; matrices with NaN/Inf are skipped with a reason."""
        with self._lock:
            todo = self.spectra_from_disk()
            if self.mapper is not None and todo:
                self.adopt(self.mapper.spectra(self.checkpoint, todo, progress))
                todo = []
            svd = None if self.device == CPU else (lambda w: singular_values_on(w, self.device))
            workers = worker_count() if self.device == CPU else 1
            together, alone = concurrent_split(todo, workers, self.itemsize)
            done = 0
            for info, spectrum, error in map_single_threaded(
                    lambda info: matrix_spectrum(self.weight(info.name), info), together, workers):
                self._take(info, spectrum, error)
                done += 1
                if progress:
                    progress(done, len(todo), info.name)
            for info in alone:
                if progress:
                    progress(done, len(todo), info.name)
                try:
                    spectrum = matrix_spectrum(self.weight(info.name), info, svd=svd,
                                               progress=_within(progress, done, len(todo), info.name))
                except NonFiniteMatrix as error:
                    spectrum = error
                self._take(info, spectrum, None)
                done += 1
            if progress and todo:
                progress(len(todo), len(todo), "")
            return {m.name: self._spectra[m.name] for m in self.matrices if m.name in self._spectra}

    def _take(self, info: MatrixInfo, spectrum: Spectrum | NonFiniteMatrix | None, error: BaseException | None
              ) -> None:
        """Adopt one computed spectrum, or record why the matrix is skipped (NaN/Inf); other errors propagate."""
        if isinstance(error, NonFiniteMatrix) or isinstance(spectrum, NonFiniteMatrix):
            self._skipped[info.name] = str(error or spectrum)
        elif error is not None:
            raise error
        else:
            self.adopt({info.name: spectrum})

    def spectra_from_disk(self) -> list[MatrixInfo]:
        """Take what the disk cache holds of the pending spectra; returns the matrices still pending after that."""
        with self._lock:
            self.adopt(self._from_disk(self.pending()), save=False)
            return self.pending()

    def known_spectrum(self, name: str) -> Spectrum | None:
        """The spectrum of this matrix if it is in memory already (no work to get it), else None."""
        return self._spectra.get(self.info(name).name)

    @property
    def computes_spectra_here(self) -> bool:
        """Spectra are computed by this process on the CPU (no Ray map, no GPU), by spectral/spectra.py's route."""
        return self.mapper is None and self.device == CPU

    def pending(self) -> list[MatrixInfo]:
        """Matrices with neither a spectrum nor a reason to skip them yet."""
        return [m for m in self.matrices if m.name not in self._spectra and m.name not in self._skipped]

    def adopt(self, results, *, save: bool = True) -> None:
        """Take spectra computed elsewhere (a Ray map, the disk cache): a `Spectrum` is cached (with the stored
        tensor's quantisation facts, and written to the disk cache), a str is the reason the matrix is skipped."""
        with self._lock:
            for name, found in results.items():
                if isinstance(found, str):
                    self._skipped[name] = found
                    continue
                self._spectra[name] = self.stored(found)
                if save and self.cache is not None and self.device.dtype == torch.float64:  # float32 GPU
                    # results stay out of the cache, which holds the float64 route's singular values
                    self.cache.save(self.checkpoint.sha256, name, SPECTRUM_ENTRY, _spectrum_tensors(found))

    def stored(self, spectrum: Spectrum) -> Spectrum:
        """The spectrum as `adopt` keeps it: with the stored tensor's quantisation facts (a new object)."""
        quant, quant_sigma = self._quantization(self.info(spectrum.name))
        return dataclasses.replace(spectrum, quant=quant, quant_sigma=quant_sigma)

    def _from_disk(self, infos: list[MatrixInfo]) -> dict[str, Spectrum]:
        if self.cache is None:
            return {}
        found = {}
        for info in infos:
            stored = self.cache.load(self.checkpoint.sha256, info.name, SPECTRUM_ENTRY)
            s = None if stored is None else stored.get("s")  # an entry of another layout counts as absent
            if s is not None and s.ndim == 1 and s.dtype == torch.float64 and int(s.numel()) == min(info.shape):
                found[info.name] = _spectrum_from(stored, info)
        return found

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

    def truncation(self, name: str, progress: Fraction | None = None) -> Factors:
        """Singular values and the short side's singular vectors of one matrix (spectral/factors.py): all a
        truncation needs. Computed once by the Gram route, kept in memory and in the disk cache."""
        info = self.info(name)
        with self._lock:
            found = self._truncations.get(info.name)
            if found is not None:
                return found
            stored = self.cache.load(self.checkpoint.sha256, info.name, FACTORS_ENTRY) if self.cache else None
            if stored is not None and {"S", "Q", "left"} <= set(stored) and \
                    int(stored["S"].numel()) == min(info.shape) and stored["Q"].ndim == 2:
                found = Factors(stored["S"], stored["Q"], bool(stored["left"].item()))
            else:
                found = self._fresh_truncation(info, progress)
                if self.cache is not None:
                    self.cache.save(self.checkpoint.sha256, info.name, FACTORS_ENTRY,
                                    {"S": found.S, "Q": found.Q, "left": torch.tensor([found.left])})
            self._truncations[info.name] = found
            return found

    def _fresh_truncation(self, info: MatrixInfo, progress: Fraction | None) -> Factors:
        """Compute one matrix's truncation factors; when its spectrum is pending and would be computed here (no
        mapper, the CPU), `matrix_spectrum` takes it from the same eigendecomposition (NaN check included)."""
        w = self.weight(info.name)
        if not (self.computes_spectra_here and info.name not in self._spectra and info.name not in self._skipped):
            return factors_and_singular_values(w, progress)[0]
        found: list[Factors] = []

        def from_factors(matrix: torch.Tensor) -> np.ndarray:
            factors, s = factors_and_singular_values(matrix, progress)
            found.append(factors)
            return s

        try:
            self.adopt({info.name: matrix_spectrum(w, info, svd=from_factors)})
        except NonFiniteMatrix as e:
            self._skipped[info.name] = str(e)
            raise
        return found[0]

    def spectra_with_truncations(self, progress: Progress | None = None) -> dict[str, Spectrum]:
        """`spectra()`, where each pending spectrum comes with its truncation factors from one eigendecomposition:
        what-ifs need both, and the pair by separate routes costs two Gram matrices and two eigensolvers."""
        with self._lock:
            todo = self.spectra_from_disk()
            if todo and self.computes_spectra_here:
                for i, info in enumerate(todo):
                    if progress:
                        progress(i, len(todo), info.name)
                    try:
                        self.truncation(info.name, _within(progress, i, len(todo), info.name))
                    except NonFiniteMatrix:
                        continue
                release_freed_memory()  # the Gram matrices and slices just freed (spectral/heap.py)
                if progress:
                    progress(len(todo), len(todo), "")
            return self.spectra(progress)

    def has_truncation(self, name: str) -> bool:
        """The truncation factors of this matrix are in memory already (no work to get them)."""
        return self.info(name).name in self._truncations

    def prefetch_truncations(self, names=None, progress: Progress | None = None,
                             should_stop: Callable[[], bool] | None = None) -> None:
        """Compute the truncation factors of `names` (default every matrix), in that order, until `should_stop`."""
        todo = [self.info(n).name for n in (names if names is not None else [m.name for m in self.matrices])]
        todo = [n for n in dict.fromkeys(todo) if n not in self._skipped]
        try:
            for i, name in enumerate(todo):
                if should_stop is not None and should_stop():
                    return
                if progress:
                    progress(i, len(todo), name)
                self.truncation(name)
        finally:
            release_freed_memory()  # the Gram matrices and slices just freed (spectral/heap.py)
        if progress and todo:
            progress(len(todo), len(todo), "")

    def checkpoint_summary(self) -> dict:
        ck = self.checkpoint
        return {"path": ck.source, "sha256": ck.sha256, "format": ck.format, "n_tensors": ck.n_tensors,
                "n_params": ck.n_params}

    def analyze(self, settings: Settings | None = None, progress: Progress | None = None, *,
                rows: Mapping[str, MatrixReport] | None = None) -> Analysis:
        """The analysis table at these settings (default `Settings()`); spectra come from the cache, so only
        arithmetic is redone (and, the first time a null other than mp is asked for, that null's spectra). `rows`:
        reports at these settings already computed from this workspace's spectra as `stored` gives them (a
        comparison's workers compute them beside the spectra), taken as they are."""
        settings = settings if settings is not None else Settings()
        rows = rows or {}
        with self._lock:
            if settings in self._analyses:
                self._analyses.move_to_end(settings)
                return self._analyses[settings]
            start = time.perf_counter()
            spectra = self.null_spectra(settings.null, progress)
            reports = [rows[name] if name in rows else analyze_spectrum(sp, settings) for name, sp in spectra.items()]
            result = Analysis(self.checkpoint_summary(), settings, reports,
                              summarize(reports, time.perf_counter() - start, self.skipped))
            self._analyses[settings] = result
            while len(self._analyses) > 16:
                self._analyses.popitem(last=False)
            return result


def _spectrum_tensors(spectrum: Spectrum) -> dict[str, torch.Tensor]:
    """What the disk cache keeps of a spectrum: the singular values and the entry statistics."""
    out = {"s": torch.from_numpy(np.array(spectrum.singular_values, dtype=np.float64))}  # a copy: writable
    e = spectrum.entries
    if e is not None:
        out["entries"] = torch.tensor([e.rows, e.cols, e.mean_square, e.row_cv, e.col_cv, e.row_spread,
                                       e.col_spread, e.excess_kurtosis], dtype=torch.float64)
    return out


def _spectrum_from(stored: dict[str, torch.Tensor], info: MatrixInfo) -> Spectrum:
    entries = None
    if "entries" in stored:
        v = stored["entries"].tolist()
        entries = EntryStats(int(v[0]), int(v[1]), *v[2:])
    return Spectrum(info.name, tuple(info.shape), info.role, tuple(info.tied_with), stored["s"].numpy().copy(),
                    entries=entries)


def _within(progress: Progress | None, i: int, total: int, label: str) -> Fraction | None:
    """A within-matrix progress callback (0..1) reported as a fractional step of the matrix loop; None without one.
    Progress callers take an int index, so the fraction is reported in the label."""
    if progress is None:
        return None

    def report(fraction: float) -> None:
        progress(i, total, f"{label} {min(max(fraction, 0.0), 1.0):.0%}")

    return report

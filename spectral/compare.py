"""Two checkpoints side by side: what changed in each weight matrix, and whether the change is low-rank.

Matrices are matched by name (tied aliases included; the prefixes the loader strips, `_orig_mod.` and `module.`,
and PEFT's `base_model.model.` are ignored, and one leading prefix that only one side carries, such as GPT-2's
`transformer.`, is aligned), in the analysed layout (spectral/matrices.py), so a shape that differs leaves both
unmatched. Per matched matrix:

- both analysis rows (spectral/analysis.py, at the same settings) and the changes in σ̂, signal rank, energy rank, α
  and stable rank;
- the update ΔW = W_B − W_A: its singular values with their own MP fit (always the MP null, at the settings'
  estimator and confidence), so a fine-tune or a planted rank-r change shows as r outliers above a small bulk
  (RMT.md §2, §9), and ‖ΔW‖_F / ‖W_A‖_F;
- how far the top singular subspaces moved: the principal angles between the top-k right (and left) singular
  vectors of A and B, k = A's signal rank (Björck & Golub 1973, as `scipy.linalg.subspace_angles` computes them).

Identical matrices compare to exactly zero change (ΔW = 0, no fit, all angles 0) without any arithmetic that could
round. What does not depend on the settings (ΔW's spectrum, singular vectors) is computed once per pair of
checkpoints and kept in a small per-process cache, so a re-compare (or a settings change) is arithmetic only.

`evaluate_pair` is the what-if across a pair: B's weights in A's model on A's evaluation batch, against A.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from spectral.analysis import MatrixReport, Settings, Spectrum, analyze_spectrum
from spectral.checkpoint import STRIPPED_PREFIXES, Checkpoint, load_checkpoint
from spectral.evaluation import EvalBatch, EvalMetrics
from spectral.library import file_stamp
from spectral.lora import (
    AdaptedMatrix,
    MergedCheckpoint,
    has_base_weights,
    is_adapter_folder,
    load_adapter,
    merge_adapter,
)
from spectral.matrices import MatrixInfo
from spectral.runtime import BatchSpec, ModelRuntime
from spectral import syrk
from spectral.spectra import singular_values, singular_values_and_reduction
from spectral.tridiagonal import Tridiagonal
from spectral.threads import map_single_threaded, worker_count
from spectral.workspace import NonFiniteMatrix, Workspace, concurrent_split, matrix_spectrum

Progress = Callable[[int, int, str], None]
IGNORED_PREFIXES = STRIPPED_PREFIXES + ("base_model.model.",)  # torch.compile, DDP, PEFT wrappers
PAIR_CACHE = 4  # pairs of checkpoints whose ΔW spectra and singular vectors are kept per process
CHANGED_METRICS = ("sigma", "n_signal", "energy_rank", "alpha", "stable_rank")


class CompareError(ValueError):
    """Two checkpoints that cannot be compared as asked (no common matrix, architectures differ); one line."""


# -------------------------------------------------------------------------------------------------- matching

@dataclass(frozen=True)
class Match:
    """One matrix present in both checkpoints (names may differ by a prefix)."""

    a: MatrixInfo
    b: MatrixInfo


@dataclass
class Matching:
    pairs: list[Match]
    unmatched_a: list[str]
    unmatched_b: list[str]
    notes: list[str] = field(default_factory=list)


def normalised(name: str) -> str:
    """The name without the wrapper prefixes the loader and PEFT add (`_orig_mod.`, `module.`, `base_model.model.`)."""
    changed = True
    while changed:
        changed = False
        for prefix in IGNORED_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix):], True
    return name


def _keys(info: MatrixInfo, strip: str = "") -> set[str]:
    out = set()
    for name in (info.name, *info.tied_with):
        n = normalised(name)
        out.add(n[len(strip):] if strip and n.startswith(strip) else n)
    return out


def _pair_up(a: Sequence[MatrixInfo], b: Sequence[MatrixInfo], strip_a: str, strip_b: str, matching: Matching
             ) -> tuple[list[MatrixInfo], list[MatrixInfo]]:
    """Pair matrices sharing a (normalised) name; returns those left on each side. Shape mismatches are noted."""
    by_key: dict[str, MatrixInfo] = {}
    for info in b:
        for key in _keys(info, strip_b):
            by_key.setdefault(key, info)
    taken: set[str] = set()
    left_a = []
    for info in a:
        partner = next((by_key[k] for k in sorted(_keys(info, strip_a)) if k in by_key), None)
        if partner is None or partner.name in taken:
            left_a.append(info)
            continue
        taken.add(partner.name)
        if tuple(partner.shape) != tuple(info.shape):
            matching.notes.append(f"{info.name}: {info.shape[0]}×{info.shape[1]} in A but {partner.shape[0]}×"
                                  f"{partner.shape[1]} in B; not compared")
            matching.unmatched_a.append(info.name)
            matching.unmatched_b.append(partner.name)
            continue
        matching.pairs.append(Match(info, partner))
    return left_a, [info for info in b if info.name not in taken]


def _leading_prefix(a: Sequence[MatrixInfo], b: Sequence[MatrixInfo]) -> tuple[str, str] | None:
    """("prefix", "") or ("", "prefix"): the one leading prefix that, stripped from one side, pairs most names."""
    votes: Counter = Counter()
    names_b = {normalised(i.name) for i in b}
    names_a = {normalised(i.name) for i in a}
    for x in names_a:
        for y in names_b:
            if x.endswith("." + y):
                votes[(x[: len(x) - len(y)], "")] += 1
            elif y.endswith("." + x):
                votes[("", y[: len(y) - len(x)])] += 1
    if not votes:
        return None
    (best, count), = votes.most_common(1)
    return best if count >= 1 else None


def match_matrices(a: Sequence[MatrixInfo], b: Sequence[MatrixInfo]) -> Matching:
    """Pairs of the same matrix in two checkpoints, in A's order, and the names left unmatched on each side."""
    matching = Matching([], [], [])
    left_a, left_b = _pair_up(a, b, "", "", matching)
    if left_a and left_b and (prefix := _leading_prefix(left_a, left_b)) is not None:
        strip_a, strip_b = prefix
        before = len(matching.pairs)
        left_a, left_b = _pair_up(left_a, left_b, strip_a, strip_b, matching)
        if len(matching.pairs) > before:
            side, p = ("A", strip_a) if strip_a else ("B", strip_b)
            matching.notes.append(f"matched {len(matching.pairs) - before} matrices after dropping the prefix {p!r} "
                                  f"of {side}'s names")
    order = {info.name: i for i, info in enumerate(a)}
    matching.pairs.sort(key=lambda m: order[m.a.name])
    matching.unmatched_a += [i.name for i in left_a]
    matching.unmatched_b += [i.name for i in left_b]
    return matching


# ---------------------------------------------------------------------------------------------- the reports

@dataclass(frozen=True)
class DeltaReport:
    """The update ΔW = W_B − W_A: signal rank and σ̂ of its own MP fit, its TW upper edge (singular-value units),
    and ‖ΔW‖_F / ‖W_A‖_F. All exactly 0 for identical matrices."""

    n_signal: int
    sigma: float
    relative_norm: float
    edge_upper: float

    def to_dict(self) -> dict:
        return {k: _finite(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SubspaceReport:
    """Principal angles (degrees, ascending) between the top-k right singular vectors of A and of B, and between
    their top-k left singular vectors; k = A's signal rank."""

    k: int
    angles_deg: tuple[float, ...]
    angles_left_deg: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"k": self.k, "angles_deg": list(self.angles_deg), "angles_left_deg": list(self.angles_left_deg)}


@dataclass
class MatrixComparison:
    """One matched matrix: both analysis rows, the update's spectrum and fit, and the subspace angles."""

    name: str  # A's name
    name_b: str
    shape: tuple[int, int]
    role: str
    a: MatrixReport
    b: MatrixReport
    delta: DeltaReport
    subspace: SubspaceReport
    delta_spectrum: Spectrum | None = field(default=None, repr=False)  # None when ΔW = 0
    delta_report: MatrixReport | None = field(default=None, repr=False)  # ΔW's full analysis row (for its figure)
    lora: AdaptedMatrix | None = None  # B is A with a LoRA adapter merged, and this matrix was adapted

    @property
    def change(self) -> dict[str, float | None]:
        """B − A for σ̂, signal rank, energy rank, α and stable rank (None where either side has no α)."""
        out = {}
        for key in CHANGED_METRICS:
            va, vb = getattr(self.a, key), getattr(self.b, key)
            out[key] = None if va is None or vb is None else vb - va
        return out

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "role": self.role, "a": self.a.to_dict(),
             "b": self.b.to_dict(), "delta": self.delta.to_dict(), "subspace": self.subspace.to_dict()}
        if self.name_b != self.name:
            d["name_b"] = self.name_b
        if self.lora is not None:
            d["lora"] = self.lora.to_dict()
        return d


@dataclass
class Comparison:
    """`compare`'s result (the issue's `compare` JSON through `to_dict`)."""

    a: dict  # checkpoint summaries (path, sha256, format, n_tensors, n_params)
    b: dict
    settings: Settings
    matrices: list[MatrixComparison]
    unmatched_a: list[str]
    unmatched_b: list[str]
    notes: list[str] = field(default_factory=list)  # prefix alignment, shape mismatches, skipped matrices
    seconds: float = 0.0

    def row(self, name: str) -> MatrixComparison:
        for m in self.matrices:
            if name in (m.name, m.name_b):
                return m
        raise KeyError(name)

    @property
    def identical(self) -> bool:
        return all(m.delta.relative_norm == 0.0 for m in self.matrices)

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "settings": asdict(self.settings),
                "matrices": [m.to_dict() for m in self.matrices],
                "unmatched": {"a": list(self.unmatched_a), "b": list(self.unmatched_b)}}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ----------------------------------------------------------------------------------------------- the numbers

@dataclass
class _Update:
    """What the pair needs of one matched matrix, whatever the settings: ΔW's spectrum and relative norm."""

    identical: bool
    relative_norm: float
    spectrum: Spectrum | None  # ΔW's singular values; None when identical
    rounding: float = 0.0  # σ of the noise that storing W_A and W_B alone adds (`rounding_sigma`)


@dataclass
class _Vectors:
    """Top singular vectors of one matrix, kept in float32 (they are computed to that accuracy): left (rows × K) and
    right (cols × K), K the most asked for."""

    left: np.ndarray
    right: np.ndarray


@dataclass
class _Read:
    """What reading one pair once gave (`PairComparer._read_pair`): A's and B's new spectra (`NonFiniteMatrix` for
    NaN/Inf weights, None where the workspace had one), their analysis rows and ΔW's fit at the comparison's
    settings, and the settings-free update and vectors for the pair's caches (`_computed`'s form); None where a
    side is not finite."""

    spectrum_a: Spectrum | NonFiniteMatrix | None
    spectrum_b: Spectrum | NonFiniteMatrix | None
    row_a: MatrixReport | None = None
    row_b: MatrixReport | None = None
    delta: tuple[DeltaReport, MatrixReport | None] | None = None
    computed: tuple[_Update | None, dict[tuple[str, str], _Vectors]] | None = None


def top_singular_vectors(matrix: torch.Tensor, k: int, reduction: Tridiagonal | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(U_k, V_k): the top-k left (rows × k) and right (cols × k) singular vectors of a matrix, as float64 arrays.

    From the eigenvectors of the short side's Gram matrix, the route spectral/spectra.py takes for the values: with
    `reduction` (that float64 Gram matrix's tridiagonal form, kept by `singular_values_and_reduction`), its top k
    for O(M²k) more; else from a float32 Gram matrix by LAPACK's ?syevx (one tridiagonalisation, k vectors). The
    other side is Wᵀu_i (or Wv_i) normalised: k never exceeds the signal rank here, so s_i is above the MP edge, well
    away from 0. In float32: an eigenvector's error is about ε₃₂·s₁²/(s_i² − s_{i+1}²) radians (Davis-Kahan), under
    0.004 degrees for any gap over 0.1% of s₁², and the angles are read in degrees."""
    w = matrix.detach().to(dtype=torch.float32, device="cpu")
    rows, cols = w.shape
    k = max(0, min(int(k), rows, cols))
    if k == 0:
        return np.zeros((rows, 0)), np.zeros((cols, 0))
    wide = rows <= cols
    if reduction is not None:
        top = torch.from_numpy(reduction.top_eigenvectors(k))
    else:
        gram = _gram32(w, wide)
        m = gram.shape[0]
        # only the top k eigenpairs (LAPACK ?syevx: one tridiagonalisation, k vectors), ascending
        _, vectors = scipy.linalg.eigh(gram.numpy(), subset_by_index=[m - k, m - 1], driver="evx")
        top = torch.from_numpy(vectors[:, ::-1].copy()).double()  # descending (a copy: torch refuses negative strides)
    top32 = top.float()  # the other side in float32, the accuracy the vectors have (no float64 copy of W)
    other = (w.T @ top32 if wide else w @ top32).double()
    other /= torch.linalg.vector_norm(other, dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    left, right = (top, other) if wide else (other, top)
    return left.numpy(), right.numpy()


def _gram32(w: torch.Tensor, wide: bool) -> torch.Tensor:
    """W·Wᵀ (wide) or Wᵀ·W in float32: by BLAS ssyrk (half the work) on a thread with one torch thread, as
    spectral/spectra.py sums its float64 Gram matrices; else torch's product on its threads."""
    if not syrk.on_this_thread() or max(w.shape) > syrk.INT_MAX:
        return w @ w.T if wide else w.T @ w
    gram = np.zeros((min(w.shape),) * 2, dtype=np.float32)
    syrk.add_gram(gram, w.numpy(), rows=wide)
    syrk.mirror_lower(gram)
    return torch.from_numpy(gram)


def principal_angles_deg(x: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """Principal angles in degrees, ascending, between the spans of two orthonormal bases x and y (n × k each).

    Knyazev & Argentati (2002), as `scipy.linalg.subspace_angles`, without its re-orthonormalisation (the bases here
    are singular vectors): cos θ_i are the singular values of xᵀy, sin θ_i those of y − x(xᵀy); an angle is taken
    from its sine where cos² θ ≥ 1/2 (small angles, where arccos loses digits) and from its cosine elsewhere."""
    if x.shape[1] == 0 or y.shape[1] == 0:
        return ()
    c = x.T @ y
    cos = np.clip(np.linalg.svd(c, compute_uv=False), 0.0, 1.0)  # descending: smallest angles first
    sin = np.clip(np.linalg.svd(y - x @ c, compute_uv=False), 0.0, 1.0)[::-1]  # ascending
    angles = np.where(cos**2 >= 0.5, np.arcsin(sin), np.arccos(cos))
    return tuple(float(v) for v in np.sort(np.degrees(angles)))


UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
ROUNDING_MARGIN = 2.0  # a fitted bulk σ̂ up to this many times the storage rounding σ is rounding, not an update
ROUNDING_EDGE = 10.0  # ... and then singular values above this many times the rounding noise's MP edge count


def rounding_sigma(dtype: str, rms: float) -> float:
    """The entry σ of the rounding error of storing a matrix with r.m.s. entry `rms` in `dtype`: u·rms, u the unit
    roundoff (float32 2⁻²⁴, float16 2⁻¹¹, bfloat16 2⁻⁸; 8-bit floats as bfloat16), about the std of an error
    uniform in ±ulp/2 (Higham 2002, §2.1)."""
    return UNIT_ROUNDOFF.get(dtype, 2.0**-8 if dtype.startswith("float8") else 2.0**-24) * rms


def delta_report(update: _Update, settings: Settings) -> tuple[DeltaReport, MatrixReport | None]:
    """ΔW's MP fit at these settings (MP null always).

    Where the fitted bulk is no larger than the rounding of the stored weights (σ̂ ≤ ROUNDING_MARGIN × the rounding
    σ, or σ̂ = 0: an exactly low-rank update, a LoRA merged in float32), the bulk is not an update: σ̂ is reported as
    0 and the signal rank counts singular values above ROUNDING_EDGE × the rounding noise's MP edge σ(√m + √n), and
    above the float64 numerical-rank tolerance s₁·max(m, n)·ε (numpy.linalg.matrix_rank's)."""
    if update.identical:
        return DeltaReport(0, 0.0, 0.0, 0.0), None
    spectrum = update.spectrum
    report = analyze_spectrum(spectrum, replace(settings, null="mp"))
    s = spectrum.singular_values
    tolerance = float(s[0]) * max(spectrum.shape) * np.finfo(np.float64).eps if s.size else 0.0
    rounding_edge = ROUNDING_EDGE * update.rounding * (math.sqrt(spectrum.M) + math.sqrt(spectrum.N))
    if not report.sigma > ROUNDING_MARGIN * update.rounding or not math.isfinite(report.edge_upper) \
            or report.edge_upper <= tolerance:
        edge = max(tolerance, rounding_edge)
        return DeltaReport(int(np.count_nonzero(s > edge)), 0.0, update.relative_norm, edge), report
    return DeltaReport(report.n_signal, report.sigma, update.relative_norm, report.edge_upper), report


class PairComparer:
    """Everything about one pair of checkpoints that does not depend on the settings, computed once per matrix:
    ΔW's spectrum and relative norm, and the top singular vectors the angles need (each pair of matrices read once
    for both); and the comparison at each settings seen. Thread-safe."""

    def __init__(self, a: Workspace, b: Workspace):
        self.a, self.b = a, b
        self.matching = match_matrices(a.matrices, b.matrices)
        self._updates: dict[str, _Update] = {}
        self._vectors: dict[tuple[str, str], _Vectors] = {}
        self._results: OrderedDict[Settings, Comparison] = OrderedDict()
        self._lock = threading.RLock()
        self.same_content = a.checkpoint.sha256 == b.checkpoint.sha256

    def _kept(self, side: str, name: str, k: int) -> _Vectors | None:
        found = self._vectors.get((side, name))
        return None if found is None or found.left.shape[1] < k else _Vectors(found.left[:, :k], found.right[:, :k])

    def _needs(self, match: Match, k: int) -> tuple[bool, bool]:
        """(ΔW's spectrum, the top-k vectors) still to compute for this pair."""
        update = self._updates.get(match.a.name)
        if self.same_content:
            return update is None, False
        vectors = k > 0 and not (update is not None and update.identical) and (
            self._kept("a", match.a.name, k) is None or self._kept("b", match.b.name, k) is None)
        return update is None, vectors

    def _prepare(self, match: Match, k: int) -> _Update:
        """ΔW's spectrum and ‖ΔW‖_F/‖W_A‖_F, and (for k > 0 and a real change) the top-k singular vectors of both
        sides, reading each matrix once; identical matrices: exactly zero, nothing computed."""
        self._store(match, self._computed(match, k))
        return self._updates[match.a.name]

    def _prepare_all(self, todo: list[tuple[Match, int]], progress: Progress | None) -> None:
        """`_prepare` for every (pair, k), small pairs side by side in single-threaded workers (spectral/threads.py;
        the calling thread stores the results and reports progress), big ones one at a time."""
        todo = [(m, k) for m, k in todo if any(self._needs(m, k))]
        workers = worker_count()
        # A and B as read (float32), and the float64 ΔW with LAPACK's copy when its SVD fallback runs (an exactly
        # low-rank update: a merged LoRA)
        together, alone = concurrent_split([m.a for m, _ in todo], workers, lambda info: 2 * 4 + 2 * 8)
        jobs = {m.a.name: (m, k) for m, k in todo}
        done = 0
        for info, result, error in map_single_threaded(lambda info: self._computed(*jobs[info.name]),
                                                       together, workers):
            if error is not None:
                raise error
            self._store(jobs[info.name][0], result)
            done += 1
            if progress:
                progress(done, len(todo), f"ΔW {info.name}")
        for info in alone:
            if progress:
                progress(done, len(todo), f"ΔW {info.name}")
            self._prepare(*jobs[info.name])
            done += 1

    def _read_once(self, settings: Settings, progress: Progress | None) -> dict[str, _Read]:
        """Matched matrices whose spectrum A or B still lacks (nothing in memory or on disk), each pair read once
        for what it needs: the missing spectra, each Gram matrix's tridiagonal form kept just long enough to give
        its top-k singular vectors (k = A's signal rank at these settings) for O(M²k) more, ΔW's spectrum, and the
        analysis rows and ΔW's fit at these settings (Python work that overlaps the other worker's LAPACK). Pairs
        run where `Workspace.spectra` would run each side's spectrum (side by side in single-threaded workers, or
        alone on every thread), so the spectra are bitwise the ones `analyze` computes; a pair whose sides would
        run differently (another dtype) is left to the analyses. ΔW is left to `_prepare_all` where the pair's
        working set is too big for a worker. Returns what was read, by A's name. Where this cannot apply (another
        null, which k depends on; Ray or a GPU; the same checkpoint twice) the spectra come from the analyses and
        the rest from `_prepare_all`."""
        if settings.null != "mp" or self.same_content or not (self.a.computes_spectra_here
                                                                and self.b.computes_spectra_here):
            return {}
        pending_a = {info.name for info in self.a.spectra_from_disk()}
        pending_b = {info.name for info in self.b.spectra_from_disk()}
        todo = [m for m in self.matching.pairs if m.a.name in pending_a or m.b.name in pending_b]
        workers = worker_count()
        side_by_side_a = {i.name for i in concurrent_split([m.a for m in todo], workers, self.a.itemsize)[0]}
        side_by_side_b = {i.name for i in concurrent_split([m.b for m in todo], workers, self.b.itemsize)[0]}
        # ΔW beside A and B as read: its float64 slices, or the whole float64 ΔW with LAPACK's copy when its SVD
        # fallback runs (an exactly low-rank update: a merged LoRA), as `_prepare_all` budgets it
        with_delta = {i.name for i in concurrent_split([m.a for m in todo], workers, lambda info: 2 * 4 + 2 * 8)[0]}
        together = [m for m in todo if m.a.name in side_by_side_a and m.b.name in side_by_side_b]
        alone = [m for m in todo if m.a.name not in side_by_side_a and m.b.name not in side_by_side_b]
        total, out = len(together) + len(alone), {}

        def take(match: Match, read: _Read) -> None:
            for workspace, side, spectrum in ((self.a, match.a, read.spectrum_a), (self.b, match.b, read.spectrum_b)):
                if spectrum is not None:
                    workspace.adopt({side.name: str(spectrum) if isinstance(spectrum, NonFiniteMatrix) else spectrum})
            if read.computed is not None:
                self._store(match, read.computed)
            out[match.a.name] = read
            if progress:
                progress(len(out), total, match.a.name)

        def read(match: Match, delta: bool = True) -> _Read:
            return self._read_pair(match, settings, match.a.name in pending_a, match.b.name in pending_b, delta)

        for match, result, error in map_single_threaded(lambda m: read(m, m.a.name in with_delta), together,
                                                        workers):
            if error is not None:
                raise error
            take(match, result)
        for match in alone:
            if progress:
                progress(len(out), total, match.a.name)
            take(match, read(match))
        return out

    def _read_pair(self, match: Match, settings: Settings, new_a: bool, new_b: bool, with_delta: bool) -> _Read:
        """`_read_once`'s work for one pair, touching no cache (safe in a worker thread): A's (B's) spectrum is
        computed when `new_a` (`new_b`), else the workspace's is used; ΔW's spectrum when `with_delta`. A matrix
        that B holds unchanged takes A's spectrum (the same bits give the same numbers)."""
        wa, wb = self.a.weight(match.a.name), self.b.weight(match.b.name)
        identical = wa.dtype == wb.dtype and torch.equal(wa, wb)
        spectrum_a, reduction_a = _spectrum_and_reduction(match.a, wa) if new_a else (None, None)
        known_a = spectrum_a if new_a else self.a.known_spectrum(match.a.name)
        if new_b and identical and isinstance(known_a, Spectrum):
            spectrum_b, reduction_b = replace(known_a, name=match.b.name, role=match.b.role,
                                              tied_with=tuple(match.b.tied_with)), None
        else:
            spectrum_b, reduction_b = _spectrum_and_reduction(match.b, wb) if new_b else (None, None)
        read = _Read(spectrum_a, spectrum_b)
        known_b = spectrum_b if new_b else self.b.known_spectrum(match.b.name)
        if any(x is None or isinstance(x, NonFiniteMatrix) for x in (known_a, known_b)):
            return read
        read.row_a = analyze_spectrum(self.a.stored(known_a), settings)
        read.row_b = analyze_spectrum(self.b.stored(known_b), settings)
        k = read.row_a.n_signal
        vectors = self._missing_vectors(match, k, (wa, wb), (reduction_a, reduction_b)) if k > 0 and not identical \
            else {}
        del reduction_a, reduction_b  # each a Gram matrix's worth of memory: gone before ΔW's Gram is summed
        update, fresh = self._updates.get(match.a.name), None
        if update is None and with_delta:
            dtypes = (self.a.checkpoint.dtypes.get(match.a.name, "float32"),
                      self.b.checkpoint.dtypes.get(match.b.name, "float32"))
            update = fresh = _delta(match, wa, wb, dtypes, (known_a, known_b))
        if update is not None:
            read.delta = delta_report(update, settings)
        read.computed = (fresh, vectors)
        return read

    def _computed(self, match: Match, k: int) -> tuple[_Update | None, dict[tuple[str, str], _Vectors]]:
        """What `_needs` says is missing for this pair, computed without touching this object's caches (safe in a
        worker thread): (ΔW's update or None when already known, the new top-k vectors by (side, name))."""
        need_update, need_vectors = self._needs(match, k)
        if self.same_content:
            return (_Update(True, 0.0, None) if need_update else None), {}
        if not (need_update or need_vectors):
            return None, {}
        wa, wb = self.a.weight(match.a.name), self.b.weight(match.b.name)
        update = None
        if need_update:
            dtypes = (self.a.checkpoint.dtypes.get(match.a.name, "float32"),
                      self.b.checkpoint.dtypes.get(match.b.name, "float32"))
            update = _delta(match, wa, wb, dtypes, (self.a.known_spectrum(match.a.name),
                                                     self.b.known_spectrum(match.b.name)))
        vectors = {}
        if k > 0 and not (update or self._updates[match.a.name]).identical:
            vectors = self._missing_vectors(match, k, (wa, wb))
        return update, vectors

    def _missing_vectors(self, match: Match, k: int, weights: tuple[torch.Tensor, torch.Tensor],
                         reductions: tuple[Tridiagonal | None, Tridiagonal | None] = (None, None)
                         ) -> dict[tuple[str, str], _Vectors]:
        """The top-k vectors of each side not kept yet, by (side, name): from that side's kept Gram reduction where
        given (`top_singular_vectors`)."""
        vectors = {}
        for side, name, w, reduction in (("a", match.a.name, weights[0], reductions[0]),
                                          ("b", match.b.name, weights[1], reductions[1])):
            if self._kept(side, name, k) is None:
                left, right = top_singular_vectors(w, k, reduction)
                vectors[(side, name)] = _Vectors(left.astype(np.float32), right.astype(np.float32))
        return vectors

    def _store(self, match: Match, computed: tuple[_Update | None, dict[tuple[str, str], _Vectors]]) -> None:
        update, vectors = computed
        if update is not None:
            self._updates[match.a.name] = update
        self._vectors.update(vectors)

    def deltas(self, settings: Settings = Settings()) -> dict[str, DeltaReport]:
        """Only the updates: ΔW's fit per matched matrix (A's name), without analysing A or B."""
        with self._lock:
            return {m.a.name: delta_report(self._prepare(m, 0), settings)[0] for m in self.matching.pairs}

    def subspace(self, match: Match, k: int, identical: bool) -> SubspaceReport:
        if k == 0:
            return SubspaceReport(0, (), ())
        if identical:
            return SubspaceReport(k, (0.0,) * k, (0.0,) * k)
        va, vb = self._kept("a", match.a.name, k), self._kept("b", match.b.name, k)
        right = principal_angles_deg(va.right.astype(np.float64), vb.right.astype(np.float64))
        left = principal_angles_deg(va.left.astype(np.float64), vb.left.astype(np.float64))
        return SubspaceReport(k, right, left)

    def compare(self, settings: Settings = Settings(), progress: Progress | None = None) -> Comparison:
        """The comparison at these settings: rows from each workspace's cached spectra, the rest from this pair's;
        remembered per settings (the last 16)."""
        with self._lock:
            if settings in self._results:
                self._results.move_to_end(settings)
                return self._results[settings]
            result = self._compare(settings, progress)
            if not result.matrices:
                raise CompareError("neither checkpoint has a weight matrix to compare" if not (
                    result.unmatched_a or result.unmatched_b) else f"no weight matrix of {result.a['path']} matches "
                    f"one of {result.b['path']} by name and shape")
            self._results[settings] = result
            while len(self._results) > 16:
                self._results.popitem(last=False)
            return result

    def _compare(self, settings: Settings, progress: Progress | None) -> Comparison:
        start = time.perf_counter()
        read = self._read_once(settings, progress)
        analysis_a = self.a.analyze(settings, progress=progress,
                                    rows={r.row_a.name: r.row_a for r in read.values() if r.row_a is not None})
        analysis_b = analysis_a if self.b is self.a else self.b.analyze(
            settings, progress=progress, rows={r.row_b.name: r.row_b for r in read.values() if r.row_b is not None})
        rows_a = {r.name: r for r in analysis_a.matrices}
        rows_b = {r.name: r for r in analysis_b.matrices}
        adapted = self.b.checkpoint.adapted if isinstance(self.b.checkpoint, MergedCheckpoint) else {}
        notes = list(self.matching.notes)
        out = []
        pairs = self.matching.pairs
        self._prepare_all([(m, rows_a[m.a.name].n_signal) for m in pairs
                           if m.a.name in rows_a and m.b.name in rows_b], progress)
        for match in pairs:
            ra, rb = rows_a.get(match.a.name), rows_b.get(match.b.name)
            if ra is None or rb is None:
                notes.append(f"{match.a.name}: skipped in {'A' if ra is None else 'B'} (NaN/Inf values)")
                continue
            update = self._prepare(match, ra.n_signal)
            fitted = read[match.a.name].delta if match.a.name in read else None
            delta, full = fitted if fitted is not None else delta_report(update, settings)
            subspace = self.subspace(match, ra.n_signal, update.identical)
            lora = next((adapted[n] for n in (match.b.name, *match.b.tied_with) if n in adapted), None)
            out.append(MatrixComparison(match.a.name, match.b.name, tuple(match.a.shape), match.a.role, ra, rb,
                                        delta, subspace, update.spectrum, full, lora))
        if progress and pairs:
            progress(len(pairs), len(pairs), "")
        return Comparison(self.a.checkpoint_summary(), self.b.checkpoint_summary(), settings, out,
                          list(self.matching.unmatched_a), list(self.matching.unmatched_b), notes,
                          time.perf_counter() - start)


def _delta(match: Match, wa: torch.Tensor, wb: torch.Tensor, dtypes: tuple[str, str],
           known: tuple[Spectrum | None, Spectrum | None] = (None, None)) -> _Update:
    """ΔW = W_B − W_A in float64: its singular values (spectral/spectra.py's route, the difference formed a slice at a
    time), ‖ΔW‖_F/‖W_A‖_F and the rounding σ of the stored weights (`dtypes`: A's and B's stored dtypes); bitwise
    equal matrices are identical without arithmetic. `known`: A's and B's spectra where computed already, whose
    Σs² = ‖W‖_F² spares a pass over the weights."""
    if wa.dtype == wb.dtype and torch.equal(wa, wb):
        return _Update(True, 0.0, None)
    s = singular_values(wb, minus=wa)
    norm_d = math.sqrt(float(np.sum(np.square(s))))  # ‖ΔW‖_F² = Σ s_i² (the Gram matrix's trace)
    if norm_d == 0.0:
        return _Update(True, 0.0, None)
    norm_a, norm_b = (math.sqrt(float(np.sum(np.square(sp.singular_values)))) if sp is not None else frobenius_norm(w)
                      for sp, w in zip(known, (wa, wb)))
    root = math.sqrt(wa.numel())
    rounding = max(rounding_sigma(dtypes[0], norm_a / root), rounding_sigma(dtypes[1], norm_b / root))
    spectrum = Spectrum(match.a.name, tuple(match.a.shape), match.a.role, (), s)
    return _Update(False, norm_d / norm_a if norm_a > 0 else math.inf, spectrum, rounding)


def _spectrum_and_reduction(info: MatrixInfo, w: torch.Tensor
                            ) -> tuple[Spectrum | NonFiniteMatrix, Tridiagonal | None]:
    """(the matrix's spectrum as `Workspace.spectra` computes it, with its Gram matrix's tridiagonal form where the
    route keeps one), or (`NonFiniteMatrix`, None) for NaN/Inf weights."""
    kept: list[Tridiagonal | None] = []

    def values(matrix: torch.Tensor) -> np.ndarray:
        s, reduction = singular_values_and_reduction(matrix)
        kept.append(reduction)
        return s

    try:
        return matrix_spectrum(w, info, svd=values), kept[0]
    except NonFiniteMatrix as error:
        return error, None


def frobenius_norm(w: torch.Tensor, chunk_elements: int = 1 << 16) -> float:
    """‖W‖_F accumulated in float64, a block of rows at a time (a float64 copy of W would double the memory)."""
    step = max(1, chunk_elements // max(int(w.shape[-1]), 1))
    total = 0.0
    for begin in range(0, int(w.shape[0]), step):
        total += float(torch.linalg.vector_norm(w[begin:begin + step], dtype=torch.float64)) ** 2
    return math.sqrt(total)


def open_pair(a, b=None) -> tuple[Checkpoint, Checkpoint]:
    """The two checkpoints of a comparison from paths (or "demo"): B may be a LoRA adapter folder, merged onto A;
    without B, A must be a folder holding a base model and its adapter (base vs base + adapter). `CheckpointError`
    for an unreadable file, `CompareError` when B is missing and A is not such a folder."""
    if b is None:
        if not (is_adapter_folder(a) and has_base_weights(a)):
            raise CompareError(f"compare needs two checkpoints, or one folder holding a base model and a LoRA adapter "
                               f"(adapter_config.json, adapter_model.safetensors); {a} is neither")
        base = load_checkpoint(str(a))
        return base, merge_adapter(base, load_adapter(a))
    def load(x) -> Checkpoint:
        return x if isinstance(x, Checkpoint) else load_checkpoint(str(x) if x != "demo" else "demo")

    if not isinstance(b, Checkpoint) and is_adapter_folder(b):
        base = load(a)
        return base, merge_adapter(base, load_adapter(b))
    return both(load, a, b)


def both(function: Callable, a, b) -> tuple:
    """(function(a), function(b)), b's in a second thread while a's runs here: opening a checkpoint is reading and
    hashing (sha256), both outside the GIL, so two files open in about the time of the larger. The same source twice
    is opened once. A's error is raised first; b's thread is waited for either way."""
    if a is b or (isinstance(a, (str, Path)) and isinstance(b, (str, Path)) and str(a) == str(b)):
        opened = function(a)
        return opened, opened
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="open") as pool:
        second = pool.submit(function, b)
        first = function(a)
        return first, second.result()


_PAIRS: OrderedDict[tuple[str, str], PairComparer] = OrderedDict()
_PAIRS_LOCK = threading.Lock()


_OPENED: OrderedDict[tuple, Workspace] = OrderedDict()  # path arguments by file stamp: a re-compare hashes nothing


def _workspace(source) -> Workspace:
    """`Workspace.open`, but a path whose files are unchanged (name, size, modification time) reuses its workspace."""
    if isinstance(source, (Workspace, Checkpoint)) or source == "demo":
        return Workspace.open(source)
    stamp = file_stamp(str(source))
    with _PAIRS_LOCK:
        found = _OPENED.get(stamp) if stamp[1] is not None else None
    if found is not None:
        return found
    opened = Workspace.open(source)
    with _PAIRS_LOCK:
        if stamp[1] is not None:
            _OPENED[stamp] = opened
            while len(_OPENED) > 2 * PAIR_CACHE:
                _OPENED.popitem(last=False)
    return opened


def comparer(a, b) -> PairComparer:
    """The pair's comparer, kept per process by content (sha256 of A, of B); the least recently used go first."""
    wa, wb = both(_workspace, a, b)
    key = (wa.checkpoint.sha256, wb.checkpoint.sha256)
    with _PAIRS_LOCK:
        found = _PAIRS.get(key)
        if found is not None:
            _PAIRS.move_to_end(key)
            return found
        made = _PAIRS[key] = PairComparer(wa, wb)
        while len(_PAIRS) > PAIR_CACHE:
            _PAIRS.popitem(last=False)
        return made


def compare(a, b, settings: Settings = Settings(), progress: Progress | None = None) -> Comparison:
    """Compare two checkpoints (each a `Workspace`, `Checkpoint`, path or "demo"); see the module docstring.
    `CompareError` when no matrix matches."""
    return comparer(a, b).compare(settings, progress)


# ------------------------------------------------------------------------------------- what-ifs across a pair

@dataclass
class PairEvaluation:
    """B's weights run in A's model on A's evaluation batch, against A's outputs (agreement, KL(A‖B), perplexity
    of A before and of B after)."""

    metrics: EvalMetrics
    batch: EvalBatch
    kind: str
    parameters: int  # module parameters taken from B
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        m = self.metrics
        return {"agreement": m.agreement, "kl": m.kl, "cosine": m.cosine, "perplexity_a": m.perplexity_before,
                "perplexity_b": m.perplexity_after, "eval": self.batch.to_dict(), "kind": self.kind,
                "parameters": self.parameters, "notes": list(self.notes)}


_IGNORED_CONFIG = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "dropout",
                   "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"}


def _config_differences(a: Checkpoint, b: Checkpoint) -> list[str]:
    ca, cb = a.config or {}, b.config or {}
    if not ca or not cb:
        return []
    # a key only one side records is no conflict: both models were built, with the same parameter shapes
    return [f"{key}: {ca[key]!r} in A, {cb[key]!r} in B" for key in sorted(set(ca) & set(cb))
            if key not in _IGNORED_CONFIG and ca[key] != cb[key]]


def evaluate_pair(a: ModelRuntime, b: ModelRuntime, spec: BatchSpec = BatchSpec(),
                  progress: Progress | None = None) -> PairEvaluation:
    """Evaluate B against A: every module parameter of A's runnable model replaced by B's, on A's evaluation batch
    (`a.evaluator(spec)`, its reference outputs computed once), so agreement and KL say how far the fine-tuned model's
    outputs moved from its base's. Both must run (`NotRunnable` otherwise) and share an architecture: the same
    parameter names and shapes and no differing hyperparameters in their configs (`CompareError` otherwise)."""
    ra, rb = a.require(), b.require()
    if ra.architecture != rb.architecture or ra.kind != rb.kind:
        raise CompareError(f"A is {ra.architecture} ({ra.kind}) and B is {rb.architecture} ({rb.kind}): B cannot run "
                           "in A's model")
    pa, pb = dict(ra.module.named_parameters()), dict(rb.module.named_parameters())
    if missing := sorted(set(pa) - set(pb)):
        raise CompareError(f"B's model has no {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                 else "") + ": the architectures differ")
    if shaped := [n for n in pa if tuple(pa[n].shape) != tuple(pb[n].shape)]:
        n = shaped[0]
        raise CompareError(f"{n} is {tuple(pa[n].shape)} in A but {tuple(pb[n].shape)} in B: the architectures differ")
    if differs := _config_differences(a.workspace.checkpoint, b.workspace.checkpoint):
        raise CompareError(f"the configs differ ({'; '.join(differs[:3])}): B would run with A's hyperparameters")
    if a.hyperparameters != b.hyperparameters:
        raise CompareError("the hyperparameters given for A and B differ: B would run with A's")
    overrides = {name: pb[name].detach().to(pa[name].dtype) for name in pa}
    evaluator = a.evaluator(spec)
    with a.lock:
        metrics = evaluator.evaluate(overrides, progress)
    return PairEvaluation(metrics, evaluator.batch, ra.kind, len(overrides))


def pair_runtimes(a, b) -> tuple[ModelRuntime, ModelRuntime]:
    """Runtimes for two checkpoints (paths, `Workspace`s or runtimes), for `evaluate_pair`."""
    def runtime(x) -> ModelRuntime:
        if isinstance(x, ModelRuntime):
            return x
        return ModelRuntime(Workspace.open(x))
    ra = runtime(a)
    return ra, runtime(b)


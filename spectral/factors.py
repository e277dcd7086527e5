"""What a truncation needs from one matrix: its singular values and its short side's singular vectors only.

With W = U·diag(s)·Vᵀ (m × n, M = min(m, n)) and Q the M × M singular vectors of the short side, the best rank-k
approximation (Eckart–Young; RMT.md §6.6) and any band of components need no long-side vectors:
- m > n (Q = V, right vectors): Σ_{lo≤i<hi} s_i u_i v_iᵀ = (W·Q[:, lo:hi])·Q[:, lo:hi]ᵀ;
- m ≤ n (Q = U, left vectors):  Σ_{lo≤i<hi} s_i u_i v_iᵀ = Q[:, lo:hi]·(Q[:, lo:hi]ᵀ·W).
Q comes from the eigendecomposition of the M × M Gram matrix in float64, the route `spectral.spectra` already takes
for the singular values (about M²N + M³ flops against about 4M²N + M³ for an economy SVD, and M² stored instead of
(m + n)·M); where s_min/s_max < `GRAM_SAFE_RATIO` the Gram loses digits and an exact SVD gives Q instead. Stored in
float32: tests/test_factors.py measures the truncation error of that choice against a float64 SVD.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spectral.spectra import GRAM_SAFE_RATIO, gram_eigh

# A held range over TRIM_RATIO times the one asked for, and over TRIM_BYTES, shrinks to it (the overlap is copied,
# nothing is recomputed). The ratio keeps slider moves (a few components either way) views, and a trim frees at
# least 3/4 of what was held; the floor leaves matrices whose largest held range is small alone (GPT-2's
# 768 × 3072 MLP matrices hold at most 307 components, 3.6 MiB), so only vocabulary-sized ones trim: GPT-2's
# 50257 × 768 embedding (196 KiB a component) from 42 components held, e.g. 180 (34.5 MiB) down to 5 (1 MiB).
TRIM_RATIO = 4
TRIM_BYTES = 8 << 20


@dataclass(frozen=True)
class Factors:
    """Singular values (descending) and the short side's singular vectors (column i belongs to S[i]), float32."""

    S: torch.Tensor  # (M,)
    Q: torch.Tensor  # (M, M)
    left: bool  # True: Q are left singular vectors (m ≤ n); False: right singular vectors (m > n)

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def nbytes(self) -> int:
        return self.S.numel() * self.S.element_size() + self.Q.numel() * self.Q.element_size()

    def components(self, matrix: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with a·b = Σ_{lo≤i<hi} s_i u_i v_iᵀ of `matrix` (the W these factors were computed from, analysed
        layout): a is m × (hi − lo), b is (hi − lo) × n."""
        q = self.Q[:, lo:hi]
        if self.left:
            return q, q.T @ matrix
        return matrix @ q, q.T

    def to(self, device: torch.device | str) -> Factors:
        return Factors(self.S.to(device), self.Q.to(device), self.left)


class HeldComponents:
    """One matrix's components along its factors' vectors, held for one index range between calls: rows lo:hi of
    QᵀW (wide W, Q its left vectors) or columns lo:hi of W·Q (tall W, Q its right vectors).

    A slider move shifts a kept rank by a few components, and a factorised cut (W_k = its first k components) then
    costs a view, or only the components not yet held, instead of the whole product (GPT-2's tied 50257 × 768
    embedding: 0.2 s a move). The range held never exceeds `limit` components, the most the caller's cut form may
    use, so it costs no more memory than the largest such cut; and
    a much smaller cut after a large one trims it (`TRIM_RATIO`, `TRIM_BYTES`), so memory follows the current cut."""

    def __init__(self, factors: Factors, matrix: torch.Tensor):
        self.factors, self.matrix = factors, matrix
        self.lo = self.hi = 0
        self.values: torch.Tensor | None = None  # wide: (hi − lo) × n; tall: m × (hi − lo)

    @property
    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.numel() * self.values.element_size()

    def components(self, lo: int, hi: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with a·b = Σ_{lo≤i<hi} s_i u_i v_iᵀ, as `Factors.components`; the long side is a view of what is
        held (valid until the next call), the other a view of Q."""
        new = self._range(lo, hi, limit)
        if self.values is None or new != (self.lo, self.hi):
            self._hold(*new)
        q = self.factors.Q[:, lo:hi]
        if self.factors.left:
            return q, self.values[lo - self.lo:hi - self.lo]
        return self.values[:, lo - self.lo:hi - self.lo], q.T

    def _range(self, lo: int, hi: int, limit: int) -> tuple[int, int]:
        """The range to hold for a request of [lo, hi): what is held, grown to cover it where the two touch (a move
        back is then a view), else the request alone: where they do not touch (the gap is not needed), where the
        union passes `limit`, or where it is a trim (over TRIM_RATIO times the request and over TRIM_BYTES)."""
        if self.values is None or hi < self.lo or self.hi < lo:
            return lo, hi
        new_lo, new_hi = min(lo, self.lo), max(hi, self.hi)
        width = new_hi - new_lo
        if width > max(limit, hi - lo):
            return lo, hi
        long_side = self.matrix.shape[1] if self.factors.left else self.matrix.shape[0]
        if width > TRIM_RATIO * (hi - lo) and width * long_side * 4 > TRIM_BYTES:
            return lo, hi
        return new_lo, new_hi

    def _hold(self, lo: int, hi: int) -> None:
        """Hold [lo, hi): what is already held and overlaps is copied, only the rest is computed."""
        old, old_lo, old_hi = self.values, self.lo, self.hi
        keep_lo, keep_hi = (max(lo, old_lo), min(hi, old_hi)) if old is not None else (0, 0)
        if keep_hi <= keep_lo:
            keep_lo = keep_hi = lo  # nothing to keep
        m, n = self.matrix.shape
        shape = (hi - lo, n) if self.factors.left else (m, hi - lo)
        values = torch.empty(shape, dtype=torch.float32)
        for a, b in ((lo, keep_lo), (keep_hi, hi)):
            if b > a:
                self._slot(values, a - lo, b - lo).copy_(self._product(a, b))
        if keep_hi > keep_lo:
            self._slot(values, keep_lo - lo, keep_hi - lo).copy_(self._slot(old, keep_lo - old_lo, keep_hi - old_lo))
        self.values, self.lo, self.hi = values, lo, hi

    def _product(self, lo: int, hi: int) -> torch.Tensor:
        q = self.factors.Q[:, lo:hi]
        return q.T @ self.matrix if self.factors.left else self.matrix @ q

    def _slot(self, values: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return values[a:b] if self.factors.left else values[:, a:b]


def truncation_factors(matrix: torch.Tensor, progress: Callable[[float], None] | None = None) -> Factors:
    """Singular values and short-side singular vectors of a 2-D matrix, by the float64 Gram route (SVD fallback);
    `progress(fraction)` as `spectral.spectra.singular_values` reports it."""
    return factors_and_singular_values(matrix, progress)[0]


def factors_and_singular_values(matrix: torch.Tensor, progress: Callable[[float], None] | None = None,
                                ) -> tuple[Factors, np.ndarray]:
    """`truncation_factors` and the float64 singular values they came from (descending): from one
    eigendecomposition, the spectrum `spectral.spectra.singular_values` gives, to rounding (eigh's eigenvalues
    against eigvalsh's, both of the same Gram matrix; tests/test_workspace.py measures it)."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    left = m <= n  # the side `gram_eigh` decomposes: W·Wᵀ when rows ≤ cols
    eigenvalues, vectors = gram_eigh(matrix, progress)
    s = eigenvalues.flip(0).clamp_min(0.0).sqrt()
    q = vectors.flip(1)
    if s.numel() and float(s[0]) > 0 and float(s[-1]) < GRAM_SAFE_RATIO * float(s[0]):
        U, s, Vh = torch.linalg.svd(matrix.detach().to(dtype=torch.float64, device="cpu"), full_matrices=False)
        q = U if left else Vh.T
    return Factors(s.float().contiguous(), q.float().contiguous(), left), np.ascontiguousarray(s.numpy())

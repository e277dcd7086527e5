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

"""Singular values of a weight matrix, computed once in float64 by the fastest route that is accurate enough.

Route (RMT.md §8): the eigenvalues of the M×M Gram matrix (M = the short side) in float64, then s = sqrt(λ_Gram).
The Gram route costs about M²N + M³ flops against about 4M²N for a bidiagonal SVD, and its absolute error on each
s_i² is about M·ε·s_1² (ε = 2.2e-16), so s_i is accurate to a relative 1e-6 while s_i/s_1 > 1e-5. When the smallest
singular value falls below that ratio (near-singular matrices, the left tail), the exact SVD is used instead.
"""
from __future__ import annotations

import numpy as np
import torch

GRAM_SAFE_RATIO = 1e-5  # below this s_min/s_max the Gram route loses digits: fall back to the SVD


def singular_values(matrix: torch.Tensor, method: str = "auto") -> np.ndarray:
    """Singular values of a 2-D tensor, descending, float64. method: "auto" (Gram, SVD fallback), "gram" or "svd"."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    w = matrix.detach().to(dtype=torch.float64, device="cpu")
    if method == "svd":
        return torch.linalg.svdvals(w).numpy()
    if method not in ("auto", "gram"):
        raise ValueError(f"unknown method {method!r}; use auto, gram or svd")
    m, n = w.shape
    gram = w @ w.T if m <= n else w.T @ w  # (M, M), symmetric positive semi-definite
    eig = torch.linalg.eigvalsh(gram).numpy()[::-1]
    s = np.sqrt(np.clip(eig, 0.0, None))
    if method == "auto" and s.size and s[0] > 0 and s[-1] < GRAM_SAFE_RATIO * s[0]:
        return torch.linalg.svdvals(w).numpy()
    return np.ascontiguousarray(s)

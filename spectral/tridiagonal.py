"""A symmetric matrix reduced to tridiagonal form once and kept: its eigenvalues, then its top eigenvectors for
O(n²k) more (Golub & Van Loan 2013, §8.3.1).

LAPACK's eigenvalue drivers reduce the matrix (dsytrd: A = Q·T·Qᵀ, Q a product of Householder reflectors), solve T
and, for vectors, apply Q to T's eigenvectors. The reduction is most of the work (dsyevd without vectors is dsytrd
then dsterf), and dsyevx, asked for k vectors after the eigenvalues were taken, would reduce the matrix a second
time. Keeping (reflectors, τ, T) and T's eigenvalues makes the top-k eigenvectors an inverse iteration on T (dstein)
and one blocked product (dormtr). dsytrd, dsterf and dormtr go through ctypes (spectral/nogil.py), which releases the
GIL, so two workers reduce two matrices at once (scipy.linalg.lapack's wrappers of dsytrd and dsterf hold it);
dstein and the dstemr fallback, O(nk), go through scipy's wrappers and hold it.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

from spectral import nogil

MAX_SIDE = 1 << 15  # LAPACK's 32-bit sizes: n² entries (and n × block-size workspaces) must stay below 2³¹
INT_MAX = 2**31 - 1

_INT = ctypes.POINTER(ctypes.c_int)
_SIGNATURES = {
    # DSYTRD(UPLO, N, A, LDA, D, E, TAU, WORK, LWORK, INFO)
    "dsytrd": [ctypes.c_char_p, _INT, ctypes.c_void_p, _INT, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
               ctypes.c_void_p, _INT, _INT],
    # DSTERF(N, D, E, INFO)
    "dsterf": [_INT, ctypes.c_void_p, ctypes.c_void_p, _INT],
    # DSYEVD(JOBZ, UPLO, N, A, LDA, W, WORK, LWORK, IWORK, LIWORK, INFO)
    "dsyevd": [ctypes.c_char_p, ctypes.c_char_p, _INT, ctypes.c_void_p, _INT, ctypes.c_void_p, ctypes.c_void_p, _INT,
               ctypes.c_void_p, _INT, _INT],
    # DORMTR(SIDE, UPLO, TRANS, M, N, A, LDA, TAU, C, LDC, WORK, LWORK, INFO)
    "dormtr": [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, _INT, _INT, ctypes.c_void_p, _INT,
               ctypes.c_void_p, ctypes.c_void_p, _INT, ctypes.c_void_p, _INT, _INT],
}


def _lapack(name: str):
    return nogil.function("cython_lapack", name, _SIGNATURES[name])


def available() -> bool:
    """Whether scipy's dsytrd, dsterf, dsyevd and dormtr were found (else callers use torch's eigensolvers)."""
    return all(_lapack(name) is not None for name in _SIGNATURES)


def _int(value: int) -> ctypes.c_int:
    return ctypes.c_int(int(value))


def _check(info: ctypes.c_int, name: str) -> None:
    if info.value != 0:
        raise RuntimeError(f"LAPACK {name} failed (info = {info.value})")


@dataclass(frozen=True)
class Tridiagonal:
    """A = Q·T·Qᵀ as LAPACK's dsytrd leaves it (lower): T's diagonal and off-diagonal, and Q as Householder
    reflectors below A's subdiagonal with their scalars τ. Not for concurrent `top_eigenvectors` calls on one object
    (dormtr writes into the reflectors' storage while it works, and restores it)."""

    reflectors: np.ndarray  # n × n, Fortran order (A's storage, overwritten by the reduction)
    tau: np.ndarray  # n - 1
    diagonal: np.ndarray  # n
    off_diagonal: np.ndarray  # n - 1

    @property
    def n(self) -> int:
        return int(self.diagonal.shape[0])

    def _inverse_iteration(self, k: int) -> np.ndarray | None:
        """T's eigenvectors of its k largest eigenvalues (ascending) by dstein, or None where T splits or an
        iteration does not converge. One block: LAPACK's block indices are then all 1."""
        n = self.n
        if _splits(self.diagonal, self.off_diagonal):
            return None
        w = np.ascontiguousarray(self.eigenvalues[n - k:])
        iblock, isplit = np.ones(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
        isplit[0] = n
        z, info = scipy.linalg.lapack.dstein(self.diagonal, self.off_diagonal, w, iblock, isplit)
        return z if info == 0 else None

    @functools.cached_property
    def eigenvalues(self) -> np.ndarray:
        """A's eigenvalues, ascending: T's, by the root-free QL/QR of dsterf (what dsyevd runs without vectors).
        Computed once (read-only)."""
        d, e = self.diagonal.copy(), self.off_diagonal.copy()  # dsterf overwrites both
        if self.n > 1:
            info = ctypes.c_int(0)
            _lapack("dsterf")(ctypes.byref(_int(self.n)), d.ctypes.data, e.ctypes.data, ctypes.byref(info))
            _check(info, "dsterf")
        d.flags.writeable = False
        return d

    def top_eigenvectors(self, k: int) -> np.ndarray:
        """Unit eigenvectors (n × k columns) of A's k largest eigenvalues, largest first: T's by inverse iteration
        at the eigenvalues already known (dstein, as dsyevx does after bisection), or by MRRR (dstemr) where T splits
        into blocks or inverse iteration fails to converge; then Q applied to them (dormtr)."""
        n, k = self.n, max(0, min(int(k), self.n))
        if k == 0:
            return np.zeros((n, 0))
        if n == 1:
            return np.ones((1, 1))
        z = self._inverse_iteration(k)
        if z is None:
            _, z = scipy.linalg.eigh_tridiagonal(self.diagonal, self.off_diagonal, select="i",
                                                 select_range=(n - k, n - 1), check_finite=False,
                                                 lapack_driver="stemr")
        c = np.array(z[:, ::-1], order="F")  # descending, a fresh copy (one column would keep a negative stride)
        dormtr = _lapack("dormtr")
        side, uplo, trans = b"L", b"L", b"N"
        m_, n_, lda = _int(n), _int(k), _int(n)
        info, query = ctypes.c_int(0), np.zeros(1)
        dormtr(side, uplo, trans, ctypes.byref(m_), ctypes.byref(n_), self.reflectors.ctypes.data, ctypes.byref(lda),
               self.tau.ctypes.data, c.ctypes.data, ctypes.byref(lda), query.ctypes.data, ctypes.byref(_int(-1)),
               ctypes.byref(info))
        _check(info, "dormtr")
        work = np.empty(max(1, int(query[0])))
        dormtr(side, uplo, trans, ctypes.byref(m_), ctypes.byref(n_), self.reflectors.ctypes.data, ctypes.byref(lda),
               self.tau.ctypes.data, c.ctypes.data, ctypes.byref(lda), work.ctypes.data,
               ctypes.byref(_int(work.size)), ctypes.byref(info))
        _check(info, "dormtr")
        return c


def _splits(d: np.ndarray, e: np.ndarray) -> bool:
    """Whether T falls apart into blocks: some e_j² < |d_j·d_{j+1}|·ulp² + safe minimum (dstebz's test; ulp is
    LAPACK's dlamch("P") = 2⁻⁵², numpy's float64 eps)."""
    ulp = np.finfo(np.float64).eps
    return bool(np.any(e**2 < np.abs(d[:-1] * d[1:]) * ulp**2 + np.finfo(np.float64).tiny))


def _square_in_place(matrix: np.ndarray) -> np.ndarray:
    """The matrix as LAPACK will overwrite it: its column-major view (a symmetric matrix's transpose is itself)."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.dtype != np.float64:
        raise ValueError(f"expected a square float64 matrix, got {matrix.dtype} of shape {matrix.shape}")
    if not matrix.flags.writeable or not (matrix.flags.c_contiguous or matrix.flags.f_contiguous):
        raise ValueError("the matrix must be writeable and contiguous (it is overwritten in place)")
    n = matrix.shape[0]
    if n > MAX_SIDE:
        raise ValueError(f"a {n} × {n} matrix is beyond what this route handles ({MAX_SIDE})")
    return matrix if matrix.flags.f_contiguous else matrix.T


def tridiagonalize(matrix: np.ndarray) -> Tridiagonal:
    """Reduce a symmetric float64 matrix in place (dsytrd, blocked; its storage becomes the reflectors). The matrix
    must be square and C- or Fortran-contiguous, and symmetric: LAPACK reads the triangle below the diagonal of its
    column-major view."""
    a = _square_in_place(matrix)
    n = a.shape[0]
    d, e, tau = np.zeros(n), np.zeros(max(n - 1, 0)), np.zeros(max(n - 1, 0))
    if n == 0:
        return Tridiagonal(a, tau, d, e)
    dsytrd = _lapack("dsytrd")
    size, info, query = _int(n), ctypes.c_int(0), np.zeros(1)
    dsytrd(b"L", ctypes.byref(size), a.ctypes.data, ctypes.byref(size), d.ctypes.data, e.ctypes.data,
           tau.ctypes.data, query.ctypes.data, ctypes.byref(_int(-1)), ctypes.byref(info))
    _check(info, "dsytrd")
    work = np.empty(max(1, int(query[0])))
    dsytrd(b"L", ctypes.byref(size), a.ctypes.data, ctypes.byref(size), d.ctypes.data, e.ctypes.data,
           tau.ctypes.data, work.ctypes.data, ctypes.byref(_int(work.size)), ctypes.byref(info))
    _check(info, "dsytrd")
    return Tridiagonal(a, tau, d, e)


def eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ascending eigenvalues, unit eigenvectors as columns) of a symmetric float64 matrix, which is overwritten
    with the eigenvectors (the second result is a view of its storage). LAPACK's dsyevd: the same reduction to
    tridiagonal form, divide and conquer on T, then Q applied; what torch's `eigh` runs too, through ctypes so the
    GIL is released (measured, one thread of the 2-core AMD machine: 33 against 45 ms at 576, 0.57 against 0.73 s at
    1,536, against torch's MKL)."""
    a = _square_in_place(matrix)
    n = a.shape[0]
    if 1 + 6 * n + 2 * n * n > INT_MAX:  # dsyevd's workspace with vectors, counted in LAPACK's 32-bit integers
        raise ValueError(f"a {n} × {n} eigendecomposition needs more workspace than 32-bit LAPACK can address")
    w = np.zeros(n)
    if n == 0:
        return w, a
    dsyevd = _lapack("dsyevd")
    size, info = _int(n), ctypes.c_int(0)
    query, iquery = np.zeros(1), np.zeros(1, dtype=np.int32)
    dsyevd(b"V", b"L", ctypes.byref(size), a.ctypes.data, ctypes.byref(size), w.ctypes.data, query.ctypes.data,
           ctypes.byref(_int(-1)), iquery.ctypes.data, ctypes.byref(_int(-1)), ctypes.byref(info))
    _check(info, "dsyevd")
    work, iwork = np.empty(max(1, int(query[0]))), np.empty(max(1, int(iquery[0])), dtype=np.int32)
    dsyevd(b"V", b"L", ctypes.byref(size), a.ctypes.data, ctypes.byref(size), w.ctypes.data, work.ctypes.data,
           ctypes.byref(_int(work.size)), iwork.ctypes.data, ctypes.byref(_int(iwork.size)), ctypes.byref(info))
    _check(info, "dsyevd")
    return w, a

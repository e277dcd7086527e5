"""C += A·Aᵀ in float64 by BLAS `dsyrk`, summed in place, with the GIL released: the Gram matrices of spectral/spectra.py.

A Gram matrix is symmetric, so `dsyrk` does half the multiply-adds of the general product torch runs for `W @ W.T`
(measured on one thread: 768 × 3072 in 26 ms against 42-47 ms, 768 × 50257 in 0.41-0.44 s against 0.73 s). By hand,
because no library offers it as needed here: torch has no symmetric rank-k update; numpy's `a @ a.T` does call
`syrk` but returns a new M × M array per slice (a second Gram matrix in memory); scipy.linalg.blas.dsyrk holds the
GIL, so the side-by-side spectra (spectral/threads.py) would run one at a time. This module calls scipy's own
`dsyrk`, taken from its public Cython BLAS table (`scipy.linalg.cython_blas`), through ctypes, which releases the GIL
for the call. scipy's BLAS runs one thread per call (spectral/threads.py caps it), so use it from threads that do
the same (`torch.get_num_threads() == 1`).
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

MIRROR_BLOCK = 512  # rows copied at a time when the upper triangle is filled from the lower one

_DSYRK: list = []  # [the ctypes function, or None where scipy's table lacks it], found once
_LOCK = threading.Lock()
_INT, _DOUBLE = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double)
_PROTOTYPE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, _INT, _INT, _DOUBLE, ctypes.c_void_p, _INT,
                              _DOUBLE, ctypes.c_void_p, _INT)


def _dsyrk():
    with _LOCK:
        if not _DSYRK:
            function = None
            try:
                from scipy.linalg import cython_blas

                capsule = cython_blas.__pyx_capi__["dsyrk"]
                api = ctypes.pythonapi
                api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
                api.PyCapsule_GetPointer.restype = ctypes.c_void_p
                api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
                function = _PROTOTYPE(api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule)))
            except (ImportError, KeyError, AttributeError, ValueError, OSError):
                function = None
            _DSYRK.append(function)
        return _DSYRK[0]


def available() -> bool:
    """Whether scipy's `dsyrk` was found (else callers use the general product)."""
    return _dsyrk() is not None


def add_gram(c: np.ndarray, block: np.ndarray, *, rows: bool) -> None:
    """c += block·blockᵀ (`rows`: the block's rows are the Gram's side, M × b) or blockᵀ·block (b × M), in c's lower
    triangle only (C order); c is a C-contiguous float64 M × M array, block a float64 array (copied if not
    C-contiguous)."""
    function = _dsyrk()
    if function is None:
        raise RuntimeError("scipy's dsyrk is unavailable")
    if c.dtype != np.float64 or not c.flags.c_contiguous or c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError("c must be a square C-contiguous float64 array")
    block = np.ascontiguousarray(block, dtype=np.float64)
    m = c.shape[0]
    if block.ndim != 2 or block.shape[0 if rows else 1] != m:
        raise ValueError(f"block of shape {block.shape} does not match a {m} x {m} Gram matrix")
    depth = block.shape[1] if rows else block.shape[0]
    if depth == 0 or m == 0:
        return
    # BLAS sees column-major arrays: c as cᵀ (its upper triangle is c's lower one) and the block transposed, so an
    # M × b block (rows) is b × M there and asks for trans = 'T'; a b × M block is M × b and asks for 'N'
    n, k = ctypes.c_int(m), ctypes.c_int(depth)
    lda, ldc = ctypes.c_int(depth if rows else m), ctypes.c_int(m)
    alpha = beta = ctypes.c_double(1.0)
    function(b"U", b"T" if rows else b"N", ctypes.byref(n), ctypes.byref(k), ctypes.byref(alpha),
             block.ctypes.data, ctypes.byref(lda), ctypes.byref(beta), c.ctypes.data, ctypes.byref(ldc))


def mirror_lower(c: np.ndarray) -> None:
    """Fill c's upper triangle from its lower one, a band of rows at a time (no M × M temporary)."""
    m = c.shape[0]
    for a in range(0, m, MIRROR_BLOCK):
        b = min(a + MIRROR_BLOCK, m)
        c[a:b, b:] = c[b:, a:b].T
        diagonal = c[a:b, a:b]
        upper = np.triu_indices(b - a, 1)
        diagonal[upper] = diagonal.T[upper]

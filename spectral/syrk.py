"""C += A·Aᵀ by BLAS `dsyrk`/`ssyrk`, summed in place with the GIL released: the Gram matrices of spectral/spectra.py
(float64) and of the top singular vectors in spectral/compare.py (float32).

A Gram matrix is symmetric, so `dsyrk` does half the multiply-adds of the general product torch runs for `W @ W.T`
(measured on one thread: 768 × 3072 in 26 ms against 42-47 ms, 768 × 50257 in 0.41-0.44 s against 0.73 s). By hand,
because no library offers it as needed here: torch has no symmetric rank-k update; numpy's `a @ a.T` does call
`syrk` but returns a new M × M array per slice (a second Gram matrix in memory); scipy.linalg.blas.dsyrk holds the
GIL, so the side-by-side spectra (spectral/threads.py) would run one at a time. This module calls scipy's own
`dsyrk` through ctypes (spectral/nogil.py), which releases the GIL for the call. scipy's BLAS runs one thread per
call (spectral/threads.py caps it), so use it from threads that do the same (`torch.get_num_threads() == 1`).
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from spectral import nogil

INT_MAX = 2**31 - 1
MIRROR_BLOCK = 512  # rows copied at a time when the upper triangle is filled from the lower one

_SCALARS = {"dsyrk": (np.float64, ctypes.c_double), "ssyrk": (np.float32, ctypes.c_float)}


def _function(name: str):
    integer, scalar = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(_SCALARS[name][1])
    return nogil.function("cython_blas", name, [ctypes.c_char_p, ctypes.c_char_p, integer, integer, scalar,
                                                ctypes.c_void_p, integer, scalar, ctypes.c_void_p, integer])


def available() -> bool:
    """Whether scipy's `dsyrk` and `ssyrk` were found (else callers use the general product)."""
    return _function("dsyrk") is not None and _function("ssyrk") is not None


def on_this_thread() -> bool:
    """Use dsyrk/ssyrk here: this thread runs torch on one thread anyway (side-by-side workers, the dashboard, Ray
    tasks), and they are found. Elsewhere (a big matrix alone on every core) torch's multi-threaded general product
    uses the cores that one-threaded BLAS would leave idle."""
    return torch.get_num_threads() == 1 and available()


def add_gram(c: np.ndarray, block: np.ndarray, *, rows: bool) -> None:
    """c += block·blockᵀ (`rows`: the block's rows are the Gram's side, M × b) or blockᵀ·block (b × M), in c's lower
    triangle only (C order); c is a C-contiguous float64 or float32 M × M array, block is converted to c's dtype
    (and copied if not C-contiguous)."""
    name = {np.dtype(np.float64): "dsyrk", np.dtype(np.float32): "ssyrk"}.get(c.dtype)
    if name is None or not c.flags.c_contiguous or not c.flags.writeable or c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError("c must be a square, writeable, C-contiguous float64 or float32 array")
    if np.may_share_memory(c, block):
        raise ValueError("block and c share memory")
    function = _function(name)
    if function is None:
        raise RuntimeError(f"scipy's {name} is unavailable")
    block = np.ascontiguousarray(block, dtype=c.dtype)
    m = c.shape[0]
    if block.ndim != 2 or block.shape[0 if rows else 1] != m:
        raise ValueError(f"block of shape {block.shape} does not match a {m} x {m} Gram matrix")
    depth = block.shape[1] if rows else block.shape[0]
    if max(m, depth) > INT_MAX:  # BLAS's 32-bit dimensions (ctypes would wrap them silently)
        raise ValueError(f"a {m} x {depth} block is beyond 32-bit BLAS dimensions")
    if depth == 0 or m == 0:
        return
    # BLAS sees column-major arrays: c as cᵀ (its upper triangle is c's lower one) and the block transposed, so an
    # M × b block (rows) is b × M there and asks for trans = 'T'; a b × M block is M × b and asks for 'N'
    n, k = ctypes.c_int(m), ctypes.c_int(depth)
    lda, ldc = ctypes.c_int(depth if rows else m), ctypes.c_int(m)
    alpha = beta = _SCALARS[name][1](1.0)
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

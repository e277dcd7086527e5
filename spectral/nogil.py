"""scipy's own BLAS and LAPACK functions, called through ctypes so that the GIL is released for the call.

Why: scipy.linalg.blas/lapack's f2py wrappers of dsyrk, dsytrd and dsterf hold the GIL (measured: two dsytrd on two
threads take twice as long as one), so the side-by-side workers of spectral/threads.py would run them one at a time.
scipy publishes every BLAS/LAPACK function as a C pointer in `scipy.linalg.cython_blas` / `cython_lapack`; ctypes
calls a foreign function with the GIL released. Arguments are passed the Fortran way (every scalar by pointer).
"""
from __future__ import annotations

import ctypes
import threading

_FOUND: dict[tuple[str, str], object] = {}  # (table, name) -> the ctypes function, or None where scipy lacks it
_LOCK = threading.Lock()


def function(table: str, name: str, argtypes: list):
    """scipy's `name` from `scipy.linalg.<table>` ("cython_blas" or "cython_lapack") as a ctypes function returning
    nothing, with these argument types; None where it cannot be found (callers then take another route)."""
    key = (table, name)
    with _LOCK:
        if key not in _FOUND:
            found = None
            try:
                import importlib

                capsule = importlib.import_module(f"scipy.linalg.{table}").__pyx_capi__[name]
                api = ctypes.pythonapi
                api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
                api.PyCapsule_GetPointer.restype = ctypes.c_void_p
                api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
                prototype = ctypes.CFUNCTYPE(None, *argtypes)
                found = prototype(api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule)))
            except (ImportError, KeyError, AttributeError, ValueError, OSError):
                found = None
            _FOUND[key] = found
        return _FOUND[key]

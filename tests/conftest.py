"""Test-session set-up: one BLAS thread for numpy (two pools on two cores were seen 10-200x slower, DESIGN.md)."""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

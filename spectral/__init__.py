"""Spectra Explorer engine: random-matrix analysis and what-if pruning of trained weight matrices.

No Streamlit import anywhere in this package: the dashboard calls it, the CLI calls it, notebooks call it.
"""
import os as _os

# numpy's OpenBLAS pool and torch's OpenMP pool fight on small machines (10-200x slowdowns were seen with two pools
# on two cores). All heavy linear algebra here runs in torch, so numpy's pool gets one thread unless the user says
# otherwise. This only takes effect if numpy is not imported yet; see spectral.threads for the torch side.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_os.environ.setdefault("MKL_NUM_THREADS", "1")

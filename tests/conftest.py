"""Test-session set-up: one BLAS thread for numpy (two pools on two cores were seen 10-200x slower, DESIGN.md)."""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The disk cache of spectra and factors (spectral/cache.py) goes to a folder of this test session, never the user's.
if "SPECTRA_CACHE" not in os.environ:
    import tempfile

    os.environ["SPECTRA_CACHE"] = tempfile.mkdtemp(prefix="spectra-cache-")

# Property tests draw the same examples on every run (and in CI): a failure is reproducible, never a coin toss.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("spectra", derandomize=True, print_blob=True)
_hypothesis_settings.load_profile("spectra")

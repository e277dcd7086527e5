"""The RMT.md §9 generator, shared by the oracle tests: W = σZ + U diag(θσ√N) Vᵀ."""
import math

import numpy as np


def spiked(m, n, theta=(), sigma=1.0, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((m, n))
    theta = np.asarray(theta, dtype=float)
    W = sigma * Z
    if theta.size:
        k, N = theta.size, max(m, n)
        U = np.linalg.qr(rng.standard_normal((m, k)))[0]
        V = np.linalg.qr(rng.standard_normal((n, k)))[0]
        W = W + (U * (theta * sigma * np.sqrt(N))) @ V.T
    return W


SPIKE_FACTORS = (1.2, 2.35, 3.5)  # planted spikes at these multiples of the BBP threshold q^(1/4) (RMT.md §6.1)


def simulate(kind, rows, cols, seed):
    """The issue-13 test matrices (tests/test_nulls.py, bench/bench_nulls.py): i.i.d. N(0,1) noise ("gauss"), three
    planted spikes at SPIKE_FACTORS ("spikes"), a Gamma(4, 1/4) column or row variance profile of mean 1
    ("colprof", "rowprof"), or Student-t entries ("t3", "t5"); seeded numpy PCG64."""
    rng = np.random.default_rng(seed)
    if kind.startswith("t"):
        return rng.standard_t(int(kind[1:]), (rows, cols))
    w = rng.standard_normal((rows, cols))
    if kind == "colprof":
        w *= np.sqrt(rng.gamma(4.0, 0.25, cols))[None, :]
    elif kind == "rowprof":
        w *= np.sqrt(rng.gamma(4.0, 0.25, rows))[:, None]
    elif kind == "spikes":
        big, small = max(rows, cols), min(rows, cols)
        theta = np.array(SPIKE_FACTORS) * (small / big) ** 0.25
        u = np.linalg.qr(rng.standard_normal((rows, theta.size)))[0]
        v = np.linalg.qr(rng.standard_normal((cols, theta.size)))[0]
        w += (u * (theta * math.sqrt(big))) @ v.T
    return w

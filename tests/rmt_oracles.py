"""The RMT.md §9 generator, shared by the oracle tests: W = σZ + U diag(θσ√N) Vᵀ."""
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

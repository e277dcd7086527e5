"""Singular values by the Gram route agree with LAPACK's SVD, and the SVD fallback guards near-singular matrices."""
import numpy as np
import pytest
import torch

from spectral.spectra import singular_values


@pytest.mark.parametrize("shape", [(300, 1200), (1200, 300), (400, 400)])
def test_gram_route_matches_svd_on_noise(shape):
    w = torch.from_numpy(np.random.default_rng(0).standard_normal(shape) * 0.02)
    exact = np.linalg.svd(w.numpy(), compute_uv=False)
    ours = singular_values(w, method="gram")
    assert ours.shape == (min(shape),)
    assert np.all(np.diff(ours) <= 0), "descending order"
    np.testing.assert_allclose(ours, exact, rtol=1e-9)


def test_float16_and_bfloat16_are_analysed_in_float64():
    w = torch.randn(64, 128, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        low = w.to(dtype)
        exact = np.linalg.svd(low.double().numpy(), compute_uv=False)
        np.testing.assert_allclose(singular_values(low), exact, rtol=1e-9)


def test_near_singular_matrix_falls_back_to_the_exact_svd():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((200, 100)))
    v, _ = np.linalg.qr(rng.standard_normal((100, 100)))
    s_true = np.logspace(0, -9, 100)  # s_min / s_max = 1e-9: the Gram route would lose these digits
    w = torch.from_numpy((u * s_true) @ v.T)
    np.testing.assert_allclose(singular_values(w), s_true, rtol=1e-5)
    gram = singular_values(w, method="gram")
    assert abs(gram[-1] - s_true[-1]) / s_true[-1] > 1e-3, "the Gram route is indeed inaccurate here"


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.ones(5))

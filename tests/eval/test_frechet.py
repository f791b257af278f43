"""Fréchet distance / FID: closed forms, symmetry, identical sets, scipy vs eigh, torch inputs, errors."""
import numpy as np
import pytest
import torch

from unlearn_fast.eval.frechet import (feature_statistics, fid_from_features, frechet_distance,
                                       trace_sqrt_product)

try:
    import scipy.linalg  # noqa: F401
    HAS_SCIPY = True
except ImportError:
    HAS_SCIPY = False

METHODS = ["eigh"] + (["scipy"] if HAS_SCIPY else [])


def random_spd(rng, d, scale=1.0, rank=None):
    a = rng.standard_normal((d, rank or d))
    return scale * (a @ a.T) / (rank or d) + (1e-3 * np.eye(d) if rank is None else 0)


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_closed_form(method):
    # Diagonal covariances commute: FID = |mu1-mu2|^2 + sum_i (a_i + b_i - 2 sqrt(a_i b_i)).
    rng = np.random.default_rng(0)
    d = 7
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_full_commuting_covariances_closed_form(method):
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T share eigenvectors: sqrt(S1 S2) = Q diag(sqrt(ab)) Q^T.
    rng = np.random.default_rng(1)
    d = 13
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.05, 2.0, d), rng.uniform(0.05, 2.0, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * (q * np.sqrt(a * b)) @ q.T)
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_and_zero_for_identical(method):
    rng = np.random.default_rng(2)
    d = 9
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ab = frechet_distance(mu1, s1, mu2, s2, method=method)
    ba = frechet_distance(mu2, s2, mu1, s1, method=method)
    assert ab == pytest.approx(ba, rel=1e-9)
    assert ab > 0
    assert frechet_distance(mu1, s1, mu1, s1, method=method) == pytest.approx(0.0, abs=1e-9)


def test_eigh_matches_general_formula_noncommuting():
    # Non-commuting covariances: compare with tr(sqrt(S1 S2)) from the eigenvalues of S1 S2 (all >= 0).
    rng = np.random.default_rng(3)
    d = 11
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 0.5)
    ev = np.linalg.eigvals(s1 @ s2)
    expected = float(np.sum(np.sqrt(np.clip(ev.real, 0, None))))
    assert trace_sqrt_product(s1, s2, method="eigh") == pytest.approx(expected, rel=1e-9)


@pytest.mark.skipif(not HAS_SCIPY, reason="scipy not installed")
def test_scipy_and_eigh_agree_on_rank_deficient_features():
    # N < D gives singular covariances (common with 2048-d features and few images).
    rng = np.random.default_rng(4)
    fa, fb = rng.standard_normal((20, 33)), rng.standard_normal((25, 33)) + 0.3
    scipy_fid = fid_from_features(fa, fb, method="scipy")
    eigh_fid = fid_from_features(fa, fb, method="eigh")
    assert eigh_fid == pytest.approx(scipy_fid, rel=1e-6, abs=1e-6)


@pytest.mark.skipif(not HAS_SCIPY, reason="scipy not installed")
def test_scipy_path_matches_direct_scipy_formula():
    from scipy import linalg
    rng = np.random.default_rng(5)
    d = 6
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert frechet_distance(mu1, s1, mu2, s2, method="scipy") == pytest.approx(expected, rel=1e-12)


def test_fid_from_features_is_frechet_of_statistics_and_accepts_torch():
    rng = np.random.default_rng(6)
    fa, fb = rng.standard_normal((40, 5)), 2 * rng.standard_normal((31, 5)) + 1
    mu_a, s_a = feature_statistics(fa)
    assert np.allclose(mu_a, fa.mean(0)) and np.allclose(s_a, np.cov(fa, rowvar=False))
    mu_b, s_b = feature_statistics(fb)
    want = frechet_distance(mu_a, s_a, mu_b, s_b, method="eigh")
    assert fid_from_features(torch.from_numpy(fa).float(), torch.from_numpy(fb), method="eigh") == \
        pytest.approx(want, rel=1e-5)
    assert fid_from_features(fa, fa.copy(), method="eigh") == pytest.approx(0.0, abs=1e-9)


def test_one_dimensional_features():
    fa, fb = np.array([[0.0], [2.0], [4.0]]), np.array([[1.0], [1.0], [4.0]])
    va, vb = np.var(fa, ddof=1), np.var(fb, ddof=1)
    expected = (fa.mean() - fb.mean()) ** 2 + va + vb - 2 * np.sqrt(va * vb)
    assert fid_from_features(fa, fb, method="eigh") == pytest.approx(expected, rel=1e-12)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="sigma1 must be"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(1), np.eye(1), np.zeros(1), np.eye(1), method="svd")
    with pytest.raises(ValueError, match="symmetric"):
        trace_sqrt_product(np.array([[1.0, 0.5], [0.0, 1.0]]), np.eye(2), method="eigh")
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        fid_from_features(np.random.rand(4, 3), np.random.rand(4, 2))
    with pytest.raises(TypeError):
        frechet_distance("a", np.eye(1), np.zeros(1), np.eye(1))


def test_works_without_scipy(monkeypatch):
    import sys
    rng = np.random.default_rng(8)
    fa, fb = rng.standard_normal((30, 4)), rng.standard_normal((30, 4)) * 1.5
    want = fid_from_features(fa, fb, method="eigh")
    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy...` now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
    assert fid_from_features(fa, fb) == want  # auto falls back to eigh
    with pytest.raises(ImportError, match="pip install scipy"):
        fid_from_features(fa, fb, method="scipy")

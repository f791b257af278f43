"""Fréchet distance between two Gaussians, and FID from two feature sets.

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))

Two ways to get tr(sqrt(S1 S2)):

- ``method="scipy"``: what clean-fid (and so the reference eval, §5.2) does: ``scipy.linalg.sqrtm(S1 @ S2)``;
  if the result is not finite, retry with ``eps * I`` added to both covariances; a complex result whose
  diagonal has an imaginary part above 1e-3 is an error, otherwise the imaginary part (round-off) is dropped.
- ``method="eigh"``: exact for symmetric PSD inputs, no scipy needed. S1 S2 is similar to the symmetric PSD
  matrix M = sqrt(S1) S2 sqrt(S1), so tr(sqrt(S1 S2)) = sum_i sqrt(lambda_i(M)). Everything runs in float64 with
  ``numpy.linalg.eigh``; eigenvalues that round-off pushed below zero are clipped to 0.

``method="auto"`` (default) takes scipy when it is installed (reference numbers) and eigh otherwise.
Inputs may be numpy arrays or torch tensors; everything is converted to float64 numpy first.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["frechet_distance", "feature_statistics", "fid_from_features", "trace_sqrt_product", "METHODS"]

METHODS = ("auto", "scipy", "eigh")


def _as_float64(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a numeric numpy array or torch tensor, got {type(x).__name__}") from e
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(mu)
    sigma = np.atleast_2d(sigma)
    if mu.ndim != 1:
        raise ValueError(f"mu{which} must be a vector [D], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{which} must be [D, D] = [{mu.shape[0]}, {mu.shape[0]}], got shape {sigma.shape}")
    return mu, sigma


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _symmetrized(sigma: np.ndarray, name: str) -> np.ndarray:
    scale = max(float(np.max(np.abs(sigma))), 1e-300)
    if float(np.max(np.abs(sigma - sigma.T))) > 1e-8 * scale:
        raise ValueError(f"{name} must be symmetric for method='eigh' (a covariance matrix)")
    return 0.5 * (sigma + sigma.T)  # remove round-off asymmetry


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    s1_half = _sqrt_psd(_symmetrized(sigma1, "sigma1"))
    m = s1_half @ _symmetrized(sigma2, "sigma2") @ s1_half  # symmetric PSD, same eigenvalues as S1 S2
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg

    out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out  # old scipy with disp=False returned (sqrtm, err)


def _trace_sqrt_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: jitter both covariances as clean-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; clean-fid drops them unless the diagonal's exceed 1e-3.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has a large imaginary component: {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(np.trace(covmean))


def _scipy_available() -> bool:
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return False
    return True


def trace_sqrt_product(sigma1: Any, sigma2: Any, *, eps: float = 1e-6, method: str = "auto") -> float:
    """tr(sqrt(sigma1 @ sigma2)) for two [D, D] covariance matrices (see module docstring for ``method``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    s1 = np.atleast_2d(_as_float64(sigma1, "sigma1"))
    s2 = np.atleast_2d(_as_float64(sigma2, "sigma2"))
    if s1.ndim != 2 or s1.shape[0] != s1.shape[1] or s1.shape != s2.shape:
        raise ValueError(f"sigma1 and sigma2 must be square and of one shape, got {s1.shape} and {s2.shape}")
    if method == "auto":
        method = "scipy" if _scipy_available() else "eigh"
    if method == "scipy":
        if not _scipy_available():
            raise ImportError("method='scipy' needs scipy (pip install scipy); method='eigh' needs nothing")
        return _trace_sqrt_scipy(s1, s2, eps)
    return _trace_sqrt_eigh(s1, s2)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *, eps: float = 1e-6,
                     method: str = "auto") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu: [D], sigma: [D, D]. Returns a float."""
    mu1, s1 = _check_gaussian(_as_float64(mu1, "mu1"), _as_float64(sigma1, "sigma1"), "1")
    mu2, s2 = _check_gaussian(_as_float64(mu2, "mu2"), _as_float64(sigma2, "sigma2"), "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(s1, s2, eps=eps, method=method)
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (``np.cov(rowvar=False)``, as clean-fid) of features [N, D]."""
    feats = _as_float64(features, "features")
    if feats.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def fid_from_features(features_a: Any, features_b: Any, *, eps: float = 1e-6, method: str = "auto") -> float:
    """FID between two feature sets [Na, D] and [Nb, D] (e.g. 2048-d Inception pool3 features)."""
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b, eps=eps, method=method)

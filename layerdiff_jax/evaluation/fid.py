"""Fréchet distance between Gaussian fits of two feature sets (the FID formula).

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). For any factors S1 = F1 F1^T and
S2 = F2 F2^T, the non-zero eigenvalues of S1 S2 are those of G G^T with G = F1^T F2, so
tr((S1 S2)^(1/2)) is the sum of G's singular values. This is the quantity torch-fidelity computes
(from the eigenvalues of S1 S2), found with symmetric, real arithmetic only. From features, the
centred features scaled by 1/sqrt(N - 1) are a factor: with fewer images than feature dimensions
(2048 for Inception) G is only N1 x N2, so no D x D matrix is ever decomposed. Statistics are
float64, covariances unbiased (as `np.cov`).
"""

from __future__ import annotations

import numpy as np


def _check_features(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {features.shape}")
    return features


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance; round-off negative eigenvalues count as 0."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _distance(mu1, f1, mu2, f2) -> float:
    """FID from means and covariance factors (D, k1), (D, k2)."""
    diff = mu1 - mu2
    tr_sqrt = np.linalg.svd(f1.T @ f2, compute_uv=False).sum()
    return float(diff @ diff + np.sum(f1**2) + np.sum(f2**2) - 2.0 * tr_sqrt)


def _mean_and_factor(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, d = features.shape
    mu = features.mean(axis=0)
    if n <= d:
        return mu, (features - mu).T / np.sqrt(n - 1)
    return mu, _psd_sqrt(np.cov(features, rowvar=False))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two (N, D) feature sets (N >= 2 each, same D)."""
    features1, features2 = _check_features(features1), _check_features(features2)
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"feature widths differ: {features1.shape[1]} vs {features2.shape[1]}")
    return _distance(*_mean_and_factor(features1), *_mean_and_factor(features2))

"""The Fréchet distance between two Gaussians fitted to features (SPEC §7.5)."""

import numpy as np

# ---------------------------------------------------------------------------------------------
# Fréchet distance (SPEC §7.5).


def feature_statistics(features):
    """Mean and unbiased covariance (float64) of features [N, D], N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {features.shape}")
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False, ddof=1)  # unbiased, as the reference protocol
    return mu, np.atleast_2d(sigma)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 sigma2)), in float64 (SPEC §7.5).

    The trace of the matrix square root is computed as the sum of sqrt(eigenvalues) of the symmetric
    positive semi-definite matrix S1 sigma2 S1, where S1 is the PSD square root of sigma1 (the two
    products have the same eigenvalues). Unlike a general sqrtm of the non-symmetric product, this is
    exact for rank-deficient covariances (fewer samples than feature dimensions) without any
    regularisation. Eigenvalues below the numerical rank threshold (dimension x float64 epsilon x the
    largest) are rounding noise of true zeros and are taken as zero: their square roots would otherwise
    add up to a visible error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} holds non-finite values")
    for name, value in (("sigma1", sigma1), ("sigma2", sigma2)):
        check_covariance(value, name)
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))
    return max(distance, 0.0)  # non-negative by definition; identical inputs can round to -1e-12


def check_covariance(sigma, name="covariance"):
    """ValueError unless `sigma` is symmetric positive semi-definite up to float64 rounding: a matrix that is
    not a covariance has no Frechet distance (its square root is not real), and used anyway it gave FD 0."""
    scale = max(float(np.abs(sigma).max(initial=0)), np.finfo(np.float64).tiny)
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-9 * scale):
        raise ValueError(f"{name} is not a covariance (not symmetric)")
    lowest = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min(initial=0))
    if lowest < -1e-9 * scale * len(sigma):
        raise ValueError(f"{name} is not a covariance (an eigenvalue of {lowest:.3g}; it must have none below 0)")


def _significant(values):
    """Eigenvalues with those under the numerical rank threshold set to zero."""
    threshold = len(values) * np.finfo(np.float64).eps * max(float(np.abs(values).max(initial=0)), 0.0)
    return np.where(values > threshold, values, 0.0)


def psd_sqrt(sigma):
    """The symmetric PSD square root of a covariance (rounding-noise eigenvalues taken as 0)."""
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * np.sqrt(_significant(values))) @ vectors.T


def trace_sqrt_product(sigma1, sigma2):
    """Tr(sqrtm(sigma1 sigma2)) for two PSD matrices, as sum sqrt(eig(S1 sigma2 S1)), S1 = sqrt(sigma1)."""
    root1 = psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(_significant(values)).sum())

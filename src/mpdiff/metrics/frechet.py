"""The Fréchet distance between two Gaussians fitted to features (SPEC §7.5)."""

import warnings

import numpy as np
import scipy.linalg

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


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2·sqrtm(sigma1·sigma2)), real part (SPEC §7.5).

    If the matrix square root of the product fails (near-singular covariances, e.g. fewer samples
    than feature dimensions), it is retried with `eps`·I added to both covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    covmean = _sqrtm_of_product(sigma1, sigma2)
    if covmean is None:
        offset = np.eye(len(sigma1)) * eps
        covmean = _sqrtm_of_product(sigma1 + offset, sigma2 + offset)
        if covmean is None:
            raise FloatingPointError("matrix square root failed even after regularisation")
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))
    return max(distance, 0.0)  # non-negative by definition; identical inputs can round to -1e-12


def _sqrtm_of_product(sigma1, sigma2, max_rel_error=1e-4):
    """sqrtm(sigma1 @ sigma2), or None when the result is non-finite or clearly inaccurate."""
    product = sigma1 @ sigma2
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # accuracy is checked below
        root = scipy.linalg.sqrtm(product)
    if not np.all(np.isfinite(root)):
        return None
    scale = max(np.linalg.norm(product), np.finfo(np.float64).tiny)
    if np.linalg.norm(root @ root - product) / scale > max_rel_error:
        return None
    # The product of two PSD matrices has real non-negative eigenvalues; a large imaginary
    # part means the square root went to the wrong branch, not rounding noise.
    if np.iscomplexobj(root) and np.abs(np.diagonal(root).imag).max() > 1e-3 * max(np.abs(np.diagonal(root)).max(), 1):
        return None
    return root

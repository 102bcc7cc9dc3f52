"""Sample-quality metrics of the ADM evaluation suite (Dhariwal & Nichol 2021), on precomputed features.

Everything here is plain NumPy/SciPy (plus torch for the batched distances of precision/recall) and
knows nothing about Inception: features in, numbers out.
"""
import warnings

import numpy as np
import scipy.linalg
import torch
from scipy.special import log_softmax

SFID_CHANNELS = 7  # ADM keeps the first 7 of the 192 channels of mixed_6/conv: 17 * 17 * 7 = 2023 features


#################################################################################
#                         Frechet distance (FID, sFID)                          #
#################################################################################

def feature_statistics(features):
    """Mean and covariance of (N, D) features, as ADM: np.cov(rowvar=False)."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need an (N, D) array with N >= 2, got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)) (Heusel et al. 2017; ADM's evaluator)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): ADM retries with eps on the diagonals.
        warnings.warn(f"FID: sqrtm(S1 S2) is not finite; adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_of_features(features, mu2, sigma2):
    """FID of (n, d) sample features against statistics (mu2, sigma2): the evaluator's and the study's one route.

    n > d: frechet_distance of the features' statistics (ADM's sqrtm). n <= d: S1 = A^T A with A = centred
    features / sqrt(n - 1) of shape (n, d), so the non-zero eigenvalues of S1 S2 are those of the symmetric PSD
    (n, n) matrix A S2 A^T and tr sqrtm(S1 S2) = sum sqrt(eig(A S2 A^T)): exact, where a 2048 x 2048 sqrtm of
    the singular S1 S2 took up to 121 s for 20 samples and needed ADM's eps retry.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs (N, D) sample features with N >= 2, got shape {features.shape}")
    n, d = features.shape
    if n > d:  # full rank: the (n, n) route would be the larger one
        return frechet_distance(*feature_statistics(features), mu2, sigma2)
    mu2, sigma2 = np.atleast_1d(mu2).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu2.shape != (d,) or sigma2.shape != (d, d):
        raise ValueError(f"mismatched statistics: {d} features vs mu {mu2.shape}, sigma {sigma2.shape}")
    mu1 = features.mean(0)
    A = (features - mu1) / np.sqrt(n - 1)  # (n, d)
    eigenvalues = np.linalg.eigvalsh(A @ sigma2 @ A.T)  # (n,)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()  # PSD: negatives are rounding
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(A * A) + np.trace(sigma2) - 2 * trace_sqrt)


def spatial_features(mixed_6_conv):
    """sFID features (Nash et al. 2021): first 7 channels of mixed_6/conv, flattened in TF's NHWC order."""
    if mixed_6_conv.ndim != 4 or mixed_6_conv.shape[1] < SFID_CHANNELS:
        raise ValueError(f"expected mixed_6/conv activations (N, 192, 17, 17), got {tuple(mixed_6_conv.shape)}")
    # (N, 192, 17, 17) -> (N, 17, 17, 7) -> (N, 2023); NHWC order so that ADM's precomputed mu_s/sigma_s line up
    return mixed_6_conv[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(mixed_6_conv.shape[0], -1)


#################################################################################
#                               Inception Score                                 #
#################################################################################

def inception_score(logits, split_size=5000):
    """IS = exp(E_x KL(p(y|x) || p(y))) per split of split_size, averaged over splits (Salimans et al. 2016; ADM)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score needs (N, classes) logits, got shape {logits.shape}")
    scores = []
    for start in range(0, len(logits), split_size):
        log_p = log_softmax(logits[start:start + split_size], axis=1)  # log p(y|x), (n, classes)
        log_p_y = np.log(np.mean(np.exp(log_p), axis=0, keepdims=True))  # log p(y), (1, classes)
        kl = np.sum(np.exp(log_p) * (log_p - log_p_y), axis=1)  # (n,)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


#################################################################################
#                    Precision and recall (Kynkaanniemi et al.)                 #
#################################################################################

def _squared_distances(a, b):
    """Squared Euclidean distances |a_i - b_j|^2, (n, m), clamped at 0 against cancellation."""
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def manifold_radii(features, k=3, batch_size=5000):
    """Squared distance of each point to its k-th nearest neighbour in the same set (the point itself is 0th)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points to estimate a manifold, got {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r in range(0, n, batch_size):
        rows = features[r:r + batch_size]
        nearest = None  # running k+1 smallest distances per row, (rows, k + 1)
        for c in range(0, n, batch_size):
            d = _squared_distances(rows, features[c:c + batch_size])
            d = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[r:r + batch_size] = nearest[:, k]
    return radii


def precision_recall(real_features, fake_features, k=3, batch_size=5000):
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls, squared Euclidean, as ADM.

    Precision: fraction of fake points inside some real point's k-NN ball; recall: the converse.
    Distances are computed in (batch_size, batch_size) blocks, so N x M never sits in memory at once.
    """
    real = torch.as_tensor(real_features)
    fake = torch.as_tensor(fake_features)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) and (M, D) features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    fake = fake.to(real.dtype)
    real_radii = manifold_radii(real, k, batch_size)
    fake_radii = manifold_radii(fake, k, batch_size)
    real_covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)  # real point in a fake ball
    fake_covered = torch.zeros(len(fake), dtype=torch.bool, device=real.device)  # fake point in a real ball
    for r in range(0, len(real), batch_size):
        for f in range(0, len(fake), batch_size):
            d = _squared_distances(real[r:r + batch_size], fake[f:f + batch_size])  # (real rows, fake cols)
            fake_covered[f:f + batch_size] |= (d <= real_radii[r:r + batch_size, None]).any(0)
            real_covered[r:r + batch_size] |= (d <= fake_radii[None, f:f + batch_size]).any(1)
    return float(fake_covered.double().mean()), float(real_covered.double().mean())

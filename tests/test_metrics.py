"""Pins evaluations/metrics.py: FID closed forms, IS limits, precision/recall on known point sets, sFID layout."""
import numpy as np
import pytest
import torch

from evaluations.metrics import (feature_statistics, frechet_distance, frechet_distance_of_features, inception_score,
                                 manifold_radii, precision_recall, spatial_features)


def random_covariance(rng, dim):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), random_covariance(rng, 16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_matches_gaussian_closed_form_for_commuting_covariances():
    # Same eigenvectors Q: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    a, b = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_eigen_formula_for_general_covariances():
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), computed independently with symmetric eigendecompositions
    rng = np.random.default_rng(2)
    s1, s2 = random_covariance(rng, 10), random_covariance(rng, 10)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = random_covariance(rng, 8), random_covariance(rng, 8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_frechet_distance_of_feature_statistics_recovers_known_gaussians():
    # 1D-per-dimension Gaussians N(0, 1) vs N(2, 4): FID -> d * (2^2 + (1 - 2)^2) = 5 d
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((200_000, 3)), 2 + 2 * rng.standard_normal((200_000, 3))
    assert frechet_distance(*feature_statistics(x), *feature_statistics(y)) == pytest.approx(15.0, rel=0.01)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_of_features_equals_the_sqrtm_route_and_the_symmetric_eigen_formula_for_few_samples():
    rng = np.random.default_rng(5)
    ref_mu, ref_sigma = feature_statistics(rng.standard_normal((400, 48)))
    w, v = np.linalg.eigh(ref_sigma)
    root2 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    for n in (20, 48, 200):  # fewer samples than features (the (n, n) route), as many, and more (ADM's sqrtm)
        samples = 1.3 * rng.standard_normal((n, 48)) + 0.2
        mu1, sigma1 = feature_statistics(samples)
        got = frechet_distance_of_features(samples, ref_mu, ref_sigma)
        # frechet_distance's route (ADM's: scipy's sqrtm of the rank-deficient S1 S2) is good to ~1e-7 relative here
        assert got == pytest.approx(frechet_distance(mu1, sigma1, ref_mu, ref_sigma), rel=1e-6)
        # independent: tr sqrt(S2^1/2 S1 S2^1/2) from a symmetric (d, d) eigendecomposition; its d - n + 1 zero
        # eigenvalues come out as rounding noise ~1e-15, whose square roots add up to ~1e-7 relative
        tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root2 @ sigma1 @ root2), 0, None)))
        expected = np.sum((mu1 - ref_mu) ** 2) + np.trace(sigma1) + np.trace(ref_sigma) - 2 * tr_covmean
        assert got == pytest.approx(expected, rel=1e-6)
    # the samples' own statistics: 0 up to the square root of one zero eigenvalue's rounding (FID ~80 here)
    assert frechet_distance_of_features(samples[:30], *feature_statistics(samples[:30])) == pytest.approx(0, abs=1e-6)


def test_inception_score_is_one_for_identical_predictions():
    logits = np.tile(np.random.default_rng(5).standard_normal(1008), (100, 1))
    assert inception_score(logits) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_equals_class_count_for_confident_uniform_predictions():
    labels = np.arange(1000) % 10
    logits = 60.0 * np.eye(10)[labels]  # softmax is one-hot up to e^-60
    assert inception_score(logits) == pytest.approx(10.0, rel=1e-12)


def test_inception_score_averages_exp_kl_over_splits():
    one_class = 60.0 * np.eye(4)[np.zeros(8, dtype=int)]  # IS 1 in the first split
    four_classes = 60.0 * np.eye(4)[np.arange(8) % 4]  # IS 4 in the second
    assert inception_score(np.concatenate([one_class, four_classes]), split_size=8) == pytest.approx(2.5, rel=1e-12)


def brute_force_precision_recall(real, fake, k):
    """Independent reference: full distance matrices and sorting (Kynkaanniemi et al. 2019, Eq. 1-3)."""
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    real_radii = np.sort(sq(real, real), axis=1)[:, k]
    fake_radii = np.sort(sq(fake, fake), axis=1)[:, k]
    d = sq(real, fake)
    return (d <= real_radii[:, None]).any(0).mean(), (d <= fake_radii[None, :]).any(1).mean()


def test_precision_recall_on_constructed_sets():
    # fake = the real points plus an equally large cluster far away: half the fakes are real-like
    # (precision 1/2) and every real point coincides with a fake (recall 1); swapping roles swaps them.
    rng = np.random.default_rng(6)
    real = rng.standard_normal((10, 5))
    fake = np.concatenate([real, 100.0 + rng.standard_normal((10, 5))])
    assert precision_recall(real, fake, k=3) == (0.5, 1.0)
    assert precision_recall(fake, real, k=3) == (1.0, 0.5)


def test_precision_recall_match_brute_force_and_do_not_depend_on_batching():
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((60, 4)), 0.5 + 1.3 * rng.standard_normal((45, 4))
    expected = brute_force_precision_recall(real, fake, 3)
    unbatched = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, batch_size=10_000)
    batched = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, batch_size=7)
    assert unbatched == pytest.approx(expected, abs=1e-12)
    assert batched == unbatched
    assert 0.0 < unbatched[0] < 1.0 and 0.0 < unbatched[1] < 1.0  # a case where both balls matter


def test_manifold_radii_are_kth_neighbour_distances_on_a_line():
    # points 0..9 on a line, k = 3: interior points reach 3 neighbours at distance 2 (squared 4),
    # the ends need distance 3 (squared 9), their neighbours distance 2 (1 on one side, 2 on the other)
    points = torch.arange(10, dtype=torch.float64)[:, None]
    radii = manifold_radii(points, k=3, batch_size=4)
    assert radii.tolist() == [9.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 9.0]
    with pytest.raises(ValueError, match="more than k"):
        manifold_radii(points[:3], k=3)


def test_spatial_features_are_first_seven_channels_in_nhwc_order():
    x = torch.randn(2, 192, 17, 17)
    features = spatial_features(x)
    assert features.shape == (2, 17 * 17 * 7)
    n, h, w, c = 1, 5, 11, 6
    assert features[n, (h * 17 + w) * 7 + c] == x[n, c, h, w]

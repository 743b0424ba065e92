"""Tests for opengan_jax.evaluation.distances (FID, KID, precision and recall)."""

import itertools

import numpy as np
import pytest
import scipy.linalg

from opengan_jax.evaluation import distances


def _random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
  factor = rng.normal(size=(dim, dim))
  return factor @ factor.T / dim + 0.1 * np.eye(dim)


def _reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
  """FID written out plainly, with the square root taken by eigendecomposition."""
  mu_a, mu_b = a.mean(0), b.mean(0)
  centred_a, centred_b = a - mu_a, b - mu_b
  sigma_a = centred_a.T @ centred_a / (len(a) - 1)
  sigma_b = centred_b.T @ centred_b / (len(b) - 1)
  # tr((Sa Sb)^1/2) = tr((Sa^1/2 Sb Sa^1/2)^1/2), whose argument is symmetric.
  root_a = scipy.linalg.sqrtm(sigma_a).real
  eigenvalues = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
  trace_root = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)


def _naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  m, dim = x.shape

  def kernel(u, v):
    return (float(np.dot(u, v)) / dim + 1.0) ** 3

  xx = sum(kernel(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
  yy = sum(kernel(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
  xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
  return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_gaussian_stats_unbiased_covariance():
  features = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]], np.float32)
  mean, covariance = distances.gaussian_stats(features)
  assert mean.dtype == np.float64
  assert covariance.dtype == np.float64
  np.testing.assert_allclose(mean, [3.0, 2.0])
  # Deviations from the mean are (-2, 0), (0, -2) and (2, 2). Their products sum to 8 and 4,
  # divided by N - 1 = 2.
  np.testing.assert_allclose(covariance, [[4.0, 2.0], [2.0, 4.0]])


def test_gaussian_stats_one_feature_is_2d():
  mean, covariance = distances.gaussian_stats(np.array([[1.0], [3.0]]))
  assert mean.shape == (1,)
  assert covariance.shape == (1, 1)
  np.testing.assert_allclose(covariance, [[2.0]])


def test_frechet_identical_sets_zero():
  features = np.random.default_rng(0).normal(size=(200, 16))
  assert distances.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_closed_form():
  mu1 = np.array([0.0, 1.0, 2.0])
  mu2 = np.array([1.0, 1.0, 0.0])
  sigma1 = np.diag([1.0, 4.0, 9.0])
  sigma2 = np.diag([4.0, 1.0, 1.0])
  # By hand: ||mu1 - mu2||^2 = 1 + 0 + 4 = 5. For diagonal covariances the trace term is
  # sum (sqrt(s1) - sqrt(s2))^2 = (1 - 2)^2 + (2 - 1)^2 + (3 - 1)^2 = 6.
  assert distances.frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) == pytest.approx(11.0)


def test_frechet_general_covariances_closed_form():
  rng = np.random.default_rng(1)
  dim = 6
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
  root1 = scipy.linalg.sqrtm(sigma1).real
  cross = scipy.linalg.sqrtm(root1 @ sigma2 @ root1).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * cross)
  result = distances.frechet_distance_from_stats(mu1, sigma1, mu2, sigma2)
  assert result == pytest.approx(expected, rel=1e-8)


def test_frechet_sampled_shifted_gaussians():
  rng = np.random.default_rng(2)
  n, dim = 20000, 3
  a = rng.normal(size=(n, dim)) * np.array([1.0, 2.0, 3.0])
  b = rng.normal(size=(n, dim)) * np.array([2.0, 1.0, 1.0]) + np.array([1.0, 0.0, -2.0])
  # Same numbers as the diagonal case by hand: 5 from the means, 6 from the covariances.
  assert distances.frechet_distance(a, b) == pytest.approx(11.0, rel=0.05)


def test_frechet_matches_reference():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(300, 20))
  b = rng.normal(size=(250, 20)) @ rng.normal(size=(20, 20)) * 0.5 + 0.3
  expected = _reference_frechet(a, b)
  assert distances.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_float32_input_computed_in_float64():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(100, 8)).astype(np.float32)
  b = (rng.normal(size=(100, 8)) + 0.5).astype(np.float32)
  expected = _reference_frechet(a.astype(np.float64), b.astype(np.float64))
  assert distances.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_fewer_samples_than_dims():
  # Singular covariances (rank 9 in 32 dimensions) still give a finite, non-negative distance.
  rng = np.random.default_rng(5)
  a = rng.normal(size=(10, 32))
  b = rng.normal(size=(10, 32)) + 1.0
  result = distances.frechet_distance(a, b)
  assert np.isfinite(result)
  assert result > 0.0


def test_frechet_offset_fallback_close(monkeypatch):
  rng = np.random.default_rng(15)
  a = rng.normal(size=(50, 8))
  b = rng.normal(size=(50, 8)) * 2.0
  direct = distances.frechet_distance(a, b)
  # A negative threshold rejects every square root, so the diagonal offset path runs.
  monkeypatch.setattr(distances, '_SQRTM_MAX_RELATIVE_ERROR', -1.0)
  with_offset = distances.frechet_distance(a, b)
  assert with_offset != direct
  assert with_offset == pytest.approx(direct, rel=1e-5)


def test_frechet_invalid_covariance_raises():
  mu = np.zeros(2)
  negative = np.diag([1.0, -1.0])
  with pytest.raises(ValueError, match='imaginary'):
    distances.frechet_distance_from_stats(mu, np.eye(2), mu, negative)


@pytest.mark.parametrize(
  ('a', 'b', 'message'),
  [
    (np.zeros((5,)), np.zeros((5, 2)), r'a must be a 2-D .* shape \(5,\)'),
    (np.zeros((5, 2)), np.zeros((5, 2, 1)), r'b must be a 2-D'),
    (np.zeros((1, 2)), np.zeros((5, 2)), r'a has 1 samples, but at least 2'),
    (np.zeros((5, 2)), np.zeros((5, 3)), r'different feature dimensions: 2 and 3'),
    (np.zeros((5, 0)), np.zeros((5, 0)), r'feature dimension 0'),
  ],
)
def test_frechet_invalid_features(a, b, message):
  with pytest.raises(ValueError, match=message):
    distances.frechet_distance(a, b)


def test_frechet_nan_names_row():
  a = np.zeros((5, 2))
  a[3, 1] = np.nan
  with pytest.raises(ValueError, match=r'a contains NaN .* 1 of 5 rows \(first: row 3\)'):
    distances.frechet_distance(a, np.ones((5, 2)))


def test_frechet_from_stats_shape_mismatch():
  with pytest.raises(ValueError, match=r'sigma2 must be a \(3, 3\) covariance'):
    distances.frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
  with pytest.raises(ValueError, match='mu1 and mu2 have different dimensions'):
    distances.frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_kernel_identical_sets_near_zero():
  rng = np.random.default_rng(6)
  features = rng.normal(size=(400, 16))
  mean, std = distances.kernel_distance(features, features, num_subsets=10, subset_size=100)
  shifted_mean, _ = distances.kernel_distance(
    features, features + 0.5, num_subsets=10, subset_size=100
  )
  # Subsets drawn from the same 400 rows share rows, so the estimate is not exactly 0.
  assert abs(mean) < 0.1 * shifted_mean
  assert std >= 0.0


def test_kernel_matches_double_loop():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(6, 3))
  y = rng.normal(size=(6, 3)) + 0.5
  # One subset of the whole set (subset_size is capped at 6) is a permutation of each set,
  # and the MMD^2 estimate does not depend on the order of the rows.
  mean, std = distances.kernel_distance(x, y, num_subsets=1, subset_size=1000)
  assert mean == pytest.approx(_naive_mmd2(x, y), rel=1e-10)
  assert std == 0.0


def test_kernel_subset_average_of_double_loop():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(12, 3))
  y = rng.normal(size=(9, 3)) * 2.0
  num_subsets, size, seed = 4, 5, 3
  # Replays the subset draws that kernel_distance documents.
  draws = np.random.default_rng(seed)
  expected = []
  for _ in range(num_subsets):
    rows_x = draws.choice(12, size, replace=False)
    rows_y = draws.choice(9, size, replace=False)
    expected.append(_naive_mmd2(x[rows_x], y[rows_y]))
  mean, std = distances.kernel_distance(x, y, num_subsets, size, seed)
  assert mean == pytest.approx(np.mean(expected), rel=1e-10)
  assert std == pytest.approx(np.std(expected), rel=1e-8)


def test_kernel_separated_sets_positive():
  rng = np.random.default_rng(9)
  a = rng.normal(size=(200, 8))
  b = rng.normal(size=(200, 8)) + 2.0
  mean, std = distances.kernel_distance(a, b, num_subsets=5, subset_size=50)
  assert mean > 10 * std
  assert mean > 0.1


def test_kernel_invalid_arguments():
  a = np.zeros((5, 2))
  with pytest.raises(ValueError, match='num_subsets must be at least 1; got 0'):
    distances.kernel_distance(a, a, num_subsets=0)
  with pytest.raises(ValueError, match='subset_size must be at least 2; got 1'):
    distances.kernel_distance(a, a, subset_size=1)
  with pytest.raises(ValueError, match='different feature dimensions'):
    distances.kernel_distance(a, np.zeros((5, 3)))


def test_precision_recall_identical_sets():
  features = np.random.default_rng(10).normal(size=(300, 5))
  precision, recall = distances.precision_recall(features, features, k=3)
  assert precision == 1.0
  assert recall == 1.0


def test_precision_recall_disjoint_sets():
  rng = np.random.default_rng(11)
  real = rng.normal(size=(200, 5))
  fake = rng.normal(size=(200, 5)) + 100.0
  precision, recall = distances.precision_recall(real, fake, k=3)
  assert precision == 0.0
  assert recall == 0.0


def _four_modes(rng: np.random.Generator, modes: np.ndarray, per_mode: int) -> np.ndarray:
  """Sample `per_mode` unit Gaussian points around each row of `modes`."""
  centres = np.repeat(modes, per_mode, axis=0)
  return centres + rng.normal(size=centres.shape)


def test_precision_recall_half_modes_copied():
  rng = np.random.default_rng(12)
  modes = np.eye(4) * 50.0  # Four modes far apart compared with their unit spread.
  real = _four_modes(rng, modes, 100)
  fake = real[:200]  # The real samples of modes 0 and 1.
  precision, recall = distances.precision_recall(real, fake, k=3)
  assert precision == 1.0
  assert recall == 0.5


def test_precision_recall_half_modes_sampled():
  rng = np.random.default_rng(12)
  modes = np.zeros((4, 2))
  modes[:, 0] = np.arange(4) * 50.0
  real = _four_modes(rng, modes, 250)
  fake = _four_modes(rng, modes[:2], 100)  # Fresh samples of modes 0 and 1 only.
  precision, recall = distances.precision_recall(real, fake, k=5)
  # A few fake samples in the tails of their mode fall outside every real ball.
  assert precision > 0.97
  assert recall == pytest.approx(0.5, abs=0.03)
  assert recall <= 0.5  # No real sample of modes 2 and 3 lies near a fake one.


def test_precision_recall_blocks_match_unblocked(monkeypatch):
  rng = np.random.default_rng(13)
  real = rng.normal(size=(150, 4))
  fake = rng.normal(size=(120, 4)) * 0.7 + 2.0
  unblocked = distances.precision_recall(real, fake, k=5)
  monkeypatch.setattr(distances, '_DISTANCE_BLOCK_ROWS', 7)
  blocked = distances.precision_recall(real, fake, k=5)
  assert blocked == unblocked
  assert 0.0 < unblocked[0] < 1.0
  assert 0.0 < unblocked[1] < 1.0


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(14)
  real = rng.normal(size=(60, 3))
  fake = rng.normal(size=(50, 3)) + 0.7
  k = 4

  def radii(points):
    pairwise = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return np.sort(pairwise, axis=1)[:, k]  # Index 0 is the point itself.

  cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # (fake, real)
  expected_precision = np.mean(np.any(cross <= radii(real)[None, :], axis=1))
  expected_recall = np.mean(np.any(cross.T <= radii(fake)[None, :], axis=1))
  precision, recall = distances.precision_recall(real, fake, k=k)
  assert precision == pytest.approx(expected_precision)
  assert recall == pytest.approx(expected_recall)


def test_precision_recall_too_few_samples():
  with pytest.raises(ValueError, match=r'fake has 3 samples, but at least 4'):
    distances.precision_recall(np.zeros((10, 2)), np.zeros((3, 2)), k=3)
  with pytest.raises(ValueError, match='k must be at least 1; got 0'):
    distances.precision_recall(np.zeros((10, 2)), np.zeros((10, 2)), k=0)

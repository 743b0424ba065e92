"""Distances between two sets of image features: Frechet distance, kernel distance, precision/recall.

Features are (N, D) arrays, one row per image. Every function computes in float64 and raises
`ValueError` naming the argument on a wrong shape, too few rows, mismatched dimensions or NaN.

- Frechet distance (FID on Inception features): Heusel et al. 2017, "GANs Trained by a Two
  Time-Scale Update Rule Converge to a Local Nash Equilibrium".
- Kernel distance (KID): Binkowski et al. 2018, "Demystifying MMD GANs", the unbiased MMD^2
  with the cubic polynomial kernel, averaged over random subsets.
- Improved precision and recall: Kynkaanniemi et al. 2019, "Improved Precision and Recall
  Metric for Assessing Generative Models", k-nearest-neighbour balls around each sample.
"""

import numpy as np
import scipy.linalg
from absl import logging

# Diagonal offset added to both covariances when the square root of their product fails.
_SQRTM_EPS = 1e-6
# Relative Frobenius error ||X @ X - A|| / ||A|| above which the square root X counts as failed.
_SQRTM_MAX_RELATIVE_ERROR = 1e-5
# Imaginary diagonal parts of the square root up to this fraction of the largest real diagonal
# entry count as rounding error. Larger ones mean a covariance is not positive semi-definite.
_MAX_RELATIVE_IMAGINARY = 1e-3
# Rows per block of pairwise distances: 1,000 x 10,000 float64 distances take 80 MB.
_DISTANCE_BLOCK_ROWS = 1000


def _check_features(name: str, features: np.ndarray, min_rows: int = 1) -> np.ndarray:
  array = np.asarray(features)
  if array.ndim != 2:
    raise ValueError(
      f'{name} must be a 2-D (num_samples, feature_dim) array; got shape {array.shape}.'
    )
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f'{name} must be a numeric array; got dtype {array.dtype}.')
  if array.shape[1] == 0:
    raise ValueError(f'{name} has feature dimension 0; got shape {array.shape}.')
  if array.shape[0] < min_rows:
    raise ValueError(
      f'{name} has {array.shape[0]} samples, but at least {min_rows} are needed; got shape '
      f'{array.shape}.'
    )
  array = array.astype(np.float64)
  if not np.all(np.isfinite(array)):
    bad_rows = np.flatnonzero(~np.all(np.isfinite(array), axis=1))
    raise ValueError(
      f'{name} contains NaN or infinite values in {bad_rows.size} of {array.shape[0]} rows '
      f'(first: row {bad_rows[0]}).'
    )
  return array


def _check_same_dim(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
  if a.shape[1] != b.shape[1]:
    raise ValueError(
      f'{name_a} and {name_b} have different feature dimensions: {a.shape[1]} and {b.shape[1]}.'
    )


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Return the mean (D,) and the unbiased covariance (D, D), dividing by N - 1, of (N, D) features."""
  array = _check_features('features', features, min_rows=2)
  mean = array.mean(axis=0)
  covariance = np.cov(array, rowvar=False, ddof=1)
  return mean, np.atleast_2d(covariance)


def _check_stats(name: str, mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1:
    raise ValueError(f'mu{name} must be a 1-D mean vector; got shape {mu.shape}.')
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(
      f'sigma{name} must be a ({mu.shape[0]}, {mu.shape[0]}) covariance to match mu{name}; '
      f'got shape {sigma.shape}.'
    )
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f'mu{name} or sigma{name} contains NaN or infinite values.')
  return mu, sigma


def _relative_sqrtm_error(root: np.ndarray, matrix: np.ndarray) -> float:
  scale = max(np.linalg.norm(matrix, 'fro'), np.finfo(np.float64).tiny)
  return float(np.linalg.norm(root @ root - matrix, 'fro') / scale)


def _sqrtm_of_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
  """Return (sigma1 sigma2)^(1/2), retrying with a small diagonal offset if it fails."""
  product = sigma1 @ sigma2
  root = scipy.linalg.sqrtm(product)
  if (
    np.all(np.isfinite(root)) and _relative_sqrtm_error(root, product) <= _SQRTM_MAX_RELATIVE_ERROR
  ):
    return root

  # A near-singular product (e.g. fewer samples than dimensions) can make sqrtm inaccurate.
  logging.warning(
    'The square root of the covariance product is inaccurate (near singular); adding %g to the '
    'diagonal of both covariances.',
    _SQRTM_EPS,
  )
  offset = _SQRTM_EPS * np.eye(sigma1.shape[0])
  product = (sigma1 + offset) @ (sigma2 + offset)
  root = scipy.linalg.sqrtm(product)
  if not np.all(np.isfinite(root)):
    raise ValueError(
      'the square root of the covariance product is not finite even with a diagonal offset of '
      f'{_SQRTM_EPS}; check that both covariances are symmetric positive semi-definite.'
    )
  return root


def frechet_distance_from_stats(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """Compute the Frechet distance between two Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  Returns the squared distance, as FID reports it:
  ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). Rounding can make it slightly
  negative for (nearly) identical statistics.

  Raises:
    ValueError: on shapes that do not match, NaN entries, or a matrix square root whose
      imaginary part is not negligible (covariances that are not positive semi-definite).
  """
  mu1, sigma1 = _check_stats('1', mu1, sigma1)
  mu2, sigma2 = _check_stats('2', mu2, sigma2)
  if mu1.shape != mu2.shape:
    raise ValueError(f'mu1 and mu2 have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}.')

  root = _sqrtm_of_product(sigma1, sigma2)
  if np.iscomplexobj(root):
    imaginary = np.max(np.abs(np.diagonal(root).imag))
    scale = max(1.0, np.max(np.abs(np.diagonal(root).real)))
    if imaginary > _MAX_RELATIVE_IMAGINARY * scale:
      raise ValueError(
        f'the square root of the covariance product has imaginary diagonal entries up to '
        f'{imaginary:.3g} (real diagonal up to {scale:.3g}); the covariances are probably not '
        'positive semi-definite.'
      )
    root = root.real

  mean_term = float(np.sum((mu1 - mu2) ** 2))
  trace_term = float(np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))
  return mean_term + trace_term


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Compute the Frechet distance between Gaussians fitted to features a (N, D) and b (M, D)."""
  a = _check_features('a', a, min_rows=2)
  b = _check_features('b', b, min_rows=2)
  _check_same_dim('a', a, 'b', b)
  return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  m = x.shape[0]
  k_xx = _polynomial_kernel(x, x)
  k_yy = _polynomial_kernel(y, y)
  k_xy = _polynomial_kernel(x, y)
  # The unbiased estimate leaves out the diagonal k(x_i, x_i) of the within-set terms.
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.mean())


def kernel_distance(
  a: np.ndarray,
  b: np.ndarray,
  num_subsets: int = 100,
  subset_size: int = 1000,
  seed: int = 0,
) -> tuple[float, float]:
  """Compute the kernel inception distance (KID) between features a (N, D) and b (M, D).

  Each of `num_subsets` rounds draws min(subset_size, N, M) rows without replacement from each
  set and computes the unbiased MMD^2 with the kernel k(x, y) = (x . y / D + 1)^3.

  Returns:
    (mean, standard deviation) of the MMD^2 estimates over the subsets; the standard deviation
    is the population one (ddof=0). The mean can be slightly negative because the estimate is
    unbiased.
  """
  a = _check_features('a', a, min_rows=2)
  b = _check_features('b', b, min_rows=2)
  _check_same_dim('a', a, 'b', b)
  if num_subsets < 1:
    raise ValueError(f'num_subsets must be at least 1; got {num_subsets}.')
  if subset_size < 2:
    raise ValueError(f'subset_size must be at least 2; got {subset_size}.')

  size = min(subset_size, a.shape[0], b.shape[0])
  rng = np.random.default_rng(seed)
  estimates = np.empty(num_subsets, np.float64)
  for i in range(num_subsets):
    x = a[rng.choice(a.shape[0], size, replace=False)]
    y = b[rng.choice(b.shape[0], size, replace=False)]
    estimates[i] = _unbiased_mmd2(x, y)
  return float(estimates.mean()), float(estimates.std())


def _squared_distances(x: np.ndarray, y: np.ndarray, y_squared_norms: np.ndarray) -> np.ndarray:
  squared = np.sum(x**2, axis=1)[:, None] + y_squared_norms[None, :] - 2.0 * (x @ y.T)
  return np.maximum(squared, 0.0)


def _knn_radii(features: np.ndarray, k: int) -> np.ndarray:
  """Return each row's squared distance to its k-th nearest other row."""
  norms = np.sum(features**2, axis=1)
  radii = np.empty(features.shape[0], np.float64)
  for start in range(0, features.shape[0], _DISTANCE_BLOCK_ROWS):
    block = features[start : start + _DISTANCE_BLOCK_ROWS]
    distances = _squared_distances(block, features, norms)
    # Each row's distance to itself (0) is the smallest, so the k-th neighbour is at index k.
    radii[start : start + block.shape[0]] = np.partition(distances, k, axis=1)[:, k]
  return radii


def _fraction_inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
  """Return the fraction of queries within the radius of at least one centre."""
  norms = np.sum(centres**2, axis=1)
  inside = np.zeros(queries.shape[0], bool)
  for start in range(0, queries.shape[0], _DISTANCE_BLOCK_ROWS):
    block = queries[start : start + _DISTANCE_BLOCK_ROWS]
    distances = _squared_distances(block, centres, norms)
    inside[start : start + block.shape[0]] = np.any(distances <= radii[None, :], axis=1)
  return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Compute improved precision and recall of fake features against real features.

  Each sample gets a ball reaching its k-th nearest neighbour within its own set. Precision is
  the fraction of fake samples inside at least one real ball, recall the fraction of real
  samples inside at least one fake ball. Distances are computed in blocks of rows, so memory
  grows with the larger set size, not its square.

  Returns:
    (precision, recall), each in [0, 1].
  """
  if k < 1:
    raise ValueError(f'k must be at least 1; got {k}.')
  real = _check_features('real', real, min_rows=k + 1)
  fake = _check_features('fake', fake, min_rows=k + 1)
  _check_same_dim('real', real, 'fake', fake)

  precision = _fraction_inside(fake, real, _knn_radii(real, k))
  recall = _fraction_inside(real, fake, _knn_radii(fake, k))
  return precision, recall

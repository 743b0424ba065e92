"""Sample sheets of OpenGAN's qualitative results, as tiles of images in [-1, 1].

Every function returns tiles, float32 (rows, columns, R, R, 3) in [-1, 1]; `save_tiles` writes them
as one PNG grid. Sources are image files or folders of images (any domain: photos, paintings).
"""

import math
import pathlib
from collections.abc import Sequence

import numpy as np

from opengan_jax import image_grid, sampling
from opengan_jax.generate import api

BLANK = 1.0  # Value of the empty tiles that fill the last row of a sheet: white.


def save_tiles(tiles: np.ndarray, path: str | pathlib.Path) -> pathlib.Path:
  """Write tiles (rows, columns, R, R, 3) in [-1, 1] as one PNG grid, atomically."""
  return image_grid.save_png(image_grid.make_grid(image_grid.to_uint8(tiles)), path)


def _check_count(name: str, value: int, minimum: int = 1) -> None:
  if value < minimum:
    raise ValueError(f'{name}={value} must be at least {minimum}.')


def one_shot(
  model: api.OpenGan,
  sources: Sequence[str],
  num_samples: int,
  seed: int = 0,
  batch_size: int = api.DEFAULT_BATCH_SIZE,
) -> np.ndarray:
  """Generate `num_samples` images per source image; each row is the source, then its samples.

  Every row uses the same latents `api.sample_latents(model, num_samples, seed)`, so rows differ
  only in the source feature. Returns tiles (S, 1 + num_samples).
  """
  _check_count('num_samples', num_samples)
  images = api.load_images(sampling.expand_sources(list(sources)), model.resolution)
  features = api.encode(model, images, batch_size)
  latents = api.sample_latents(model, num_samples, seed)
  num_sources = len(images)
  samples = api.generate(
    model,
    np.tile(latents, (num_sources, 1)),
    np.repeat(features, num_samples, axis=0),
    batch_size,
  )
  samples = samples.reshape((num_sources, num_samples) + samples.shape[1:])
  return np.concatenate([images[:, None], samples], axis=1)


def single_source(
  model: api.OpenGan,
  source: str,
  num_samples: int,
  columns: int = 8,
  seed: int = 0,
  batch_size: int = api.DEFAULT_BATCH_SIZE,
) -> np.ndarray:
  """Show the diversity of one source: the source in the top-left tile, then its samples.

  Samples use the latents `api.sample_latents(model, num_samples, seed)` in row-major order;
  white tiles fill the last row. Returns tiles (ceil((1 + num_samples) / columns), columns).
  """
  _check_count('num_samples', num_samples)
  _check_count('columns', columns)
  paths = sampling.expand_sources([source])
  if len(paths) != 1:
    raise ValueError(f'source {source} contains {len(paths)} images; pass one image file.')
  image = api.load_images(paths, model.resolution)
  feature = api.encode(model, image, batch_size)
  latents = api.sample_latents(model, num_samples, seed)
  samples = api.generate(model, latents, np.repeat(feature, num_samples, axis=0), batch_size)
  tiles = np.concatenate([image, samples])
  rows = math.ceil(len(tiles) / columns)
  blank = np.full((rows * columns - len(tiles),) + tiles.shape[1:], BLANK, np.float32)
  return np.concatenate([tiles, blank]).reshape((rows, columns) + tiles.shape[1:])


def intra_class(
  model: api.OpenGan,
  sources: Sequence[str],
  num_latents: int,
  max_sources: int = 8,
  seed: int = 0,
  batch_size: int = api.DEFAULT_BATCH_SIZE,
) -> np.ndarray:
  """Show intra-class diversity: sources of one class in the top row, then one row per latent.

  Row i + 1 contains G(z_i, f_s) for each source s, with z_i fixed along the row, so structure stays
  while the class details change. Takes the first `max_sources` images of `sources` (files or a
  class folder). Returns tiles (1 + num_latents, min(max_sources, #images)).
  """
  _check_count('num_latents', num_latents)
  _check_count('max_sources', max_sources)
  paths = sampling.expand_sources(list(sources))[:max_sources]
  images = api.load_images(paths, model.resolution)
  features = api.encode(model, images, batch_size)
  latents = api.sample_latents(model, num_latents, seed)
  num_sources = len(images)
  samples = api.generate(
    model,
    np.repeat(latents, num_sources, axis=0),
    np.tile(features, (num_latents, 1)),
    batch_size,
  )
  samples = samples.reshape((num_latents, num_sources) + samples.shape[1:])
  return np.concatenate([images[None], samples], axis=0)


def interpolation(
  model: api.OpenGan,
  sources: Sequence[str],
  latent_steps: int = 8,
  feature_steps: int = 8,
  method: str = 'linear',
  seed: int = 0,
  batch_size: int = api.DEFAULT_BATCH_SIZE,
) -> np.ndarray:
  """Interpolate between two latents along rows and between two source features down columns.

  The latents are `api.sample_latents(model, 2, seed)`; the features are those of the two source
  images. Tile (i, j) is G(interp(z_0, z_1, j), interp(f_0, f_1, i)) with `method` 'linear' or
  'slerp'. Returns tiles (feature_steps, latent_steps).
  """
  paths = sampling.expand_sources(list(sources))
  if len(paths) != 2:
    raise ValueError(
      f'interpolation needs exactly 2 source images, got {len(paths)} ({", ".join(map(str, paths))}).'
    )
  features = api.encode(model, api.load_images(paths, model.resolution), batch_size)
  end_latents = api.sample_latents(model, 2, seed)
  latents = api.interpolate(end_latents[0], end_latents[1], latent_steps, method)
  features = api.interpolate(features[0], features[1], feature_steps, method)
  samples = api.generate(
    model,
    np.tile(latents, (feature_steps, 1)),
    np.repeat(features, latent_steps, axis=0),
    batch_size,
  )
  return samples.reshape((feature_steps, latent_steps) + samples.shape[1:])


def random_features(
  model: api.OpenGan,
  gaussians: Sequence[api.FeatureGaussian],
  rows_per_gaussian: int,
  columns: int,
  seed: int = 0,
  batch_size: int = api.DEFAULT_BATCH_SIZE,
) -> np.ndarray:
  """Generate from random latents and features drawn from each Gaussian, with no source image.

  Gaussian g fills `rows_per_gaussian` rows; its features are `gaussians[g].sample(n, seed + g)`
  and every sample has its own latent. Returns tiles (len(gaussians) * rows_per_gaussian, columns).
  """
  _check_count('rows_per_gaussian', rows_per_gaussian)
  _check_count('columns', columns)
  if not gaussians:
    raise ValueError('no feature Gaussians given; fit one with api.fit_global or fit_per_class.')
  per_gaussian = rows_per_gaussian * columns
  features = np.concatenate([g.sample(per_gaussian, seed + i) for i, g in enumerate(gaussians)])
  latents = api.sample_latents(model, len(features), seed)
  samples = api.generate(model, latents, features, batch_size)
  return samples.reshape((len(gaussians) * rows_per_gaussian, columns) + samples.shape[1:])

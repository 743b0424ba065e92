"""Python API of the generation tools: restore a workdir, encode images, generate, sample features.

Conventions of every function here:
  images: float32 (N, R, R, 3) in [-1, 1], where R is the GAN resolution (config.resolution).
  features: float32 (N, D) metric embeddings f = F(x), D = config.extractor.feature_dim.
  latents: float32 (N, Z) drawn from N(0, 1), Z = config.model.z_dim (128).
Networks run in evaluation mode (BatchNorm running statistics), so each output row depends only on
its own inputs, and work is split into batches of `batch_size` rows to bound memory.
"""

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from opengan_jax import config_checks, gan, sampling, train, train_extractor
from opengan_jax.data import decode

DEFAULT_BATCH_SIZE = 64
MAX_ERROR_DETAIL = 400  # Characters of an orbax error quoted in a mismatch error.
# Latents and sampled features of one seed come from different streams, so they are independent.
LATENT_STREAM = 0
FEATURE_STREAM = 1


@dataclasses.dataclass(frozen=True)
class OpenGan:
  """A trained workdir restored for generation: its config, G, F and their variables."""

  config: ml_collections.ConfigDict
  generator: Any  # models.Generator with axis_name=None.
  generator_variables: dict[str, Any]
  extractor: nn.Module  # models.ResNet18 or models.EfficientNetLite, with axis_name=None.
  extractor_variables: dict[str, Any]
  step: int  # GAN training step of the restored checkpoint.
  workdir: pathlib.Path
  generate_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
  encode_fn: Callable[[Any, jax.Array], jax.Array]

  @property
  def resolution(self) -> int:
    return int(self.config.resolution)

  @property
  def z_dim(self) -> int:
    return int(self.config.model.z_dim)

  @property
  def feature_dim(self) -> int:
    return int(self.config.extractor.feature_dim)


def _require_checkpoint(workdir: pathlib.Path, stage: str) -> None:
  """Raise FileNotFoundError unless `workdir` contains a finished checkpoint of `stage`.

  Checked before orbax opens the folder, because its manager creates missing folders.
  """
  directory = workdir / 'checkpoints' / stage
  steps = [p for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
  if not steps:
    raise FileNotFoundError(
      f'no {stage} checkpoint in {directory}: workdir {workdir} has not been trained yet. Train '
      f'it with `python main.py --config=... --workdir={workdir}`, or check --workdir.'
    )


def _shape_mismatch_error(
  workdir: pathlib.Path, what: str, config: ml_collections.ConfigDict, error: Exception
) -> ValueError:
  detail = str(error)
  if len(detail) > MAX_ERROR_DETAIL:
    detail = detail[:MAX_ERROR_DETAIL] + ' ...'
  return ValueError(
    f'the {what} checkpoint in {workdir} does not match {workdir / "config.json"} '
    f'(resolution={config.resolution}, model.ch={config.model.ch}): {detail}. The config file '
    'was changed after training or the checkpoint comes from another run; restore the config '
    'the workdir was trained with, or use the matching --workdir.'
  )


def _check_extractor_shapes(
  config: ml_collections.ConfigDict, extractor: nn.Module, variables: dict[str, Any]
) -> None:
  image_size = config_checks.extractor_image_size(config)
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  expected = jax.eval_shape(lambda: extractor.init(jax.random.PRNGKey(0), dummy, train=False))
  expected_shapes = jax.tree.map(lambda x: tuple(x.shape), dict(expected))
  restored_shapes = jax.tree.map(lambda x: tuple(np.shape(x)), variables)
  if expected_shapes != restored_shapes:
    raise ValueError(
      'the extractor variables do not have the shapes of the '
      f'{type(extractor).__name__} that config.extractor.arch={config.extractor.arch!r} builds '
      f'for {image_size} px inputs'
    )


def restore(workdir: str | pathlib.Path) -> OpenGan:
  """Restore G and F from the newest checkpoints of a feature-conditional training workdir.

  Raises FileNotFoundError when the workdir has no config.json or no checkpoint, and ValueError
  when it was trained without feature conditioning or its checkpoints do not match config.json.
  """
  workdir = pathlib.Path(workdir)
  config = sampling.load_workdir_config(str(workdir))
  if config.model.conditioning != 'feature':
    raise ValueError(
      f'{workdir} was trained with model.conditioning={config.model.conditioning!r}; the '
      "generation tools need a feature-conditional ('feature') workdir."
    )
  _require_checkpoint(workdir, train_extractor.STAGE)
  _require_checkpoint(workdir, train.STAGE)

  extractor, extractor_variables = train_extractor.restore_extractor(config, str(workdir))
  try:
    _check_extractor_shapes(config, extractor, extractor_variables)
  except ValueError as error:
    raise _shape_mismatch_error(workdir, 'extractor', config, error) from error
  try:
    generator, generator_variables, step = sampling.restore_generator(
      config, str(workdir), config.dataset.num_train_classes
    )
  except (ValueError, KeyError, TypeError) as error:
    raise _shape_mismatch_error(workdir, 'GAN', config, error) from error

  image_size = config_checks.extractor_image_size(config)
  logging.info('Restored G of GAN step %d and F from %s.', step, workdir)
  return OpenGan(
    config=config,
    generator=generator,
    generator_variables=generator_variables,
    extractor=extractor,
    extractor_variables=jax.device_get(extractor_variables),
    step=int(step),
    workdir=workdir,
    generate_fn=gan.make_generate_fn(generator),
    encode_fn=jax.jit(
      lambda variables, images: gan.extract_features(extractor, variables, images, image_size)
    ),
  )


def load_images(paths: Sequence[str | pathlib.Path], resolution: int) -> np.ndarray:
  """Decode image files into float32 (N, resolution, resolution, 3) in [-1, 1].

  Each image is resized so its shorter side is `resolution` and centre-cropped, as in training.
  Raises ValueError naming the first file that is not a readable image, before decoding the rest.
  """
  images = []
  for path in paths:
    try:
      images.append(decode.load_image(str(path), resolution))
    except decode.DECODE_ERRORS as error:
      raise ValueError(
        f'source {path} is not a readable image ({error}); pass JPEG, PNG or other image files.'
      ) from error
  if not images:
    raise ValueError('no images to load: pass at least one image file or folder.')
  return np.stack(images).astype(np.float32) / 127.5 - 1.0


def _check_batch_size(batch_size: int) -> None:
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be at least 1.')


def apply_in_batches(
  fn, variables, arrays: Sequence[np.ndarray], batch_size: int, prepare=np.asarray
) -> np.ndarray:
  """Apply `fn(variables, *rows)` to `batch_size` rows at a time and concatenate the outputs.

  `prepare` converts each chunk of each array (e.g. uint8 images to floats) just before use, so
  only one batch is converted at a time. Chunks are padded (and the padding dropped) to
  `batch_size` rows, or to the next power of two when all rows fit in one batch, so `fn` compiles
  for a few shapes only.
  """
  _check_batch_size(batch_size)
  total = len(arrays[0])
  padded_size = batch_size if total > batch_size else min(batch_size, 1 << (total - 1).bit_length())
  outputs = []
  for start in range(0, total, batch_size):
    chunk = [prepare(a[start : start + batch_size]) for a in arrays]
    size = len(chunk[0])
    if size < padded_size:
      chunk = [np.concatenate([c, np.repeat(c[-1:], padded_size - size, axis=0)]) for c in chunk]
    outputs.append(np.asarray(fn(variables, *chunk))[:size])
  if not outputs:
    raise ValueError('no rows to process: pass at least one image, latent or feature.')
  return np.concatenate(outputs)


def _to_float_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def encode(model: OpenGan, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """Return the metric features F(x), float32 (N, D), of images (N, H, W, 3).

  Images are float in [-1, 1], or uint8 in [0, 255] (converted one batch at a time, so a large
  uint8 dataset never exists in float32 as a whole). F resizes them to its input size.
  """
  if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
    raise ValueError(f'expected images of shape (N, H, W, 3), got {np.shape(images)}')
  return apply_in_batches(
    model.encode_fn, model.extractor_variables, [images], batch_size, _to_float_images
  )


def encode_files(
  model: OpenGan, paths: Sequence[str | pathlib.Path], batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
  """Return the features, float32 (N, D), of image files, decoding one batch at a time.

  Raises ValueError naming the first file that is not a readable image.
  """
  _check_batch_size(batch_size)
  features = []
  for start in range(0, len(paths), batch_size):
    images = load_images(paths[start : start + batch_size], model.resolution)
    features.append(encode(model, images, batch_size))
  if not features:
    raise ValueError('no images to encode: pass at least one image file or folder.')
  return np.concatenate(features)


def generate(
  model: OpenGan,
  latents: np.ndarray,
  features: np.ndarray,
  batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
  """Return G(z, f): float32 images (N, R, R, 3) in [-1, 1] for latents (N, Z), features (N, D)."""
  latents = np.asarray(latents, np.float32)
  features = np.asarray(features, np.float32)
  if latents.shape != (len(latents), model.z_dim):
    raise ValueError(f'expected latents of shape (N, {model.z_dim}), got {latents.shape}')
  if features.shape != (len(latents), model.feature_dim):
    raise ValueError(
      f'expected features of shape ({len(latents)}, {model.feature_dim}) to match the latents, '
      f'got {features.shape}'
    )
  return apply_in_batches(
    model.generate_fn, model.generator_variables, [latents, features], batch_size
  )


def seed_key(seed: int, stream: int) -> jax.Array:
  """Return the rng key of one random stream (LATENT_STREAM, FEATURE_STREAM) of a seed."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream)


def sample_latents(model: OpenGan, num: int, seed: int) -> np.ndarray:
  """Draw `num` latents z ~ N(0, I): float32 (num, Z), reproducible for a seed."""
  return np.asarray(jax.random.normal(seed_key(seed, LATENT_STREAM), (num, model.z_dim)))


@dataclasses.dataclass(frozen=True)
class FeatureGaussian:
  """A diagonal Gaussian over the feature space.

  mean and std are float32 (D,) vectors; `fit_global` fills every entry with the same scalar.
  """

  mean: np.ndarray
  std: np.ndarray

  def sample(self, num: int, seed: int) -> np.ndarray:
    """Draw `num` features, float32 (num, D), reproducibly for a seed."""
    key = seed_key(seed, FEATURE_STREAM)
    noise = np.asarray(jax.random.normal(key, (num, len(self.mean))))
    return (self.mean + self.std * noise).astype(np.float32)


def _check_features(features: np.ndarray, minimum: int) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < minimum:
    raise ValueError(
      f'need at least {minimum} feature vectors of shape (N, D) to estimate a Gaussian, got '
      f'{features.shape}; pass more images.'
    )
  return features


def fit_global(features: np.ndarray) -> FeatureGaussian:
  """Fit one Gaussian with a single mean and standard deviation over all dimensions.

  This is the label-free feature sampling of OpenGAN's random generation: the scalar mean and
  std of every entry of `features` (N, D), shared by all D dimensions.
  """
  features = _check_features(features, 2)
  dim = features.shape[1]
  mean = np.full((dim,), features.mean(), np.float32)
  std = np.full((dim,), features.std(), np.float32)
  return FeatureGaussian(mean, std)


def fit_per_class(features: np.ndarray, labels: np.ndarray) -> list[FeatureGaussian]:
  """Fit one diagonal Gaussian (mean and std of each dimension) per class label 0..C-1."""
  features = _check_features(features, 2)
  labels = np.asarray(labels)
  gaussians = []
  for label in range(int(labels.max()) + 1):
    rows = features[labels == label]
    if len(rows) < 2:
      raise ValueError(
        f'class {label} has {len(rows)} images; per-class Gaussians need at least 2 per class.'
      )
    gaussians.append(
      FeatureGaussian(rows.mean(0).astype(np.float32), rows.std(0).astype(np.float32))
    )
  return gaussians


def lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
  """Linear interpolation (1 - t) a + t b."""
  return ((1.0 - t) * np.asarray(a, np.float64) + t * np.asarray(b, np.float64)).astype(np.float32)


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
  """Spherical interpolation along the great circle between the directions of `a` and `b`.

  The weights use the angle between the two vectors, so norms are interpolated along with the
  direction; t=0 returns `a` and t=1 returns `b` exactly. Falls back to `lerp` for (anti)parallel
  vectors, whose great circle is undefined.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  cosine = np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)
  omega = np.arccos(np.clip(cosine, -1.0, 1.0))
  if np.sin(omega) < 1e-6:
    return lerp(a, b, t)
  weight_a = np.sin((1.0 - t) * omega) / np.sin(omega)
  weight_b = np.sin(t * omega) / np.sin(omega)
  return (weight_a * a + weight_b * b).astype(np.float32)


INTERPOLATIONS = {'linear': lerp, 'slerp': slerp}


def interpolate(a: np.ndarray, b: np.ndarray, steps: int, method: str) -> np.ndarray:
  """Return `steps` vectors from `a` to `b` (both included), float32 (steps, len(a))."""
  if method not in INTERPOLATIONS:
    raise ValueError(f'interpolation {method!r} is invalid: use one of {", ".join(INTERPOLATIONS)}')
  if steps < 2:
    raise ValueError(f'steps={steps} must be at least 2, so both end points are included.')
  fn = INTERPOLATIONS[method]
  return np.stack([fn(a, b, float(t)) for t in np.linspace(0.0, 1.0, steps)])


def list_labelled_folders(
  folders: Sequence[str | pathlib.Path], max_per_class: int | None = None
) -> tuple[list[pathlib.Path], np.ndarray, list[str]]:
  """List the images of class folders: returns (paths, int32 labels (N,), class names).

  Each folder is one class. A single folder that contains no images but sub-folders is read as a
  root with one sub-folder per class. `max_per_class` keeps the first images of each class.
  """
  folders = [pathlib.Path(f) for f in folders]
  if len(folders) == 1 and folders[0].is_dir():
    subfolders = sorted(
      p for p in folders[0].iterdir() if p.is_dir() and not p.name.startswith('.')
    )
    has_images = any(p.suffix.lower() in sampling.IMAGE_SUFFIXES for p in folders[0].iterdir())
    if subfolders and not has_images:
      folders = subfolders
  paths, labels, names = [], [], []
  for label, folder in enumerate(folders):
    if not folder.is_dir():
      raise FileNotFoundError(f'class folder {folder} not found; pass one folder per class.')
    files = sampling.expand_sources([str(folder)])[:max_per_class]
    paths.extend(files)
    labels.extend([label] * len(files))
    names.append(folder.name)
  return paths, np.asarray(labels, np.int32), names


def dataset_images(model: OpenGan, subset: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Load the workdir's own dataset at the GAN resolution from its decoded-image cache.

  subset: 'train' (training classes) or 'novel'. Returns uint8 images (N, R, R, 3), int32 labels
  (N,) counted from 0 within the subset, and the class names.
  """
  if subset not in ('train', 'novel'):
    raise ValueError(f"subset={subset!r} is invalid: use 'train' or 'novel'.")
  split = train.load_data(model.config, str(model.workdir), model.resolution)
  if subset == 'train':
    return split.train_images, split.train_labels, list(split.train_class_names)
  return split.novel_images, split.novel_labels, list(split.novel_class_names)

"""Attribute and pose directions in latent and feature space, and traversals along them.

The method follows appendix A.2 of Ditria, Meyer and Drummond, "OpenGAN: Open Set Generative
Adversarial Networks" (ACCV 2020). A multi-label classifier is trained with binary cross-entropy
on labelled real images and then labels generated samples. The latents and features of the
positive and of the negative samples of each attribute are averaged, and a generated image moves
along the line between the two means, once in latent space and once in feature space.
"""

import csv
import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from opengan_jax.generate import api
from opengan_jax.models import ResNet18

CLASSIFIERS = ('resnet18', 'linear')
MAX_LISTED_MISSING = 5


@dataclasses.dataclass(frozen=True)
class AttributeLabels:
  """Binary labels of real images."""

  paths: list[pathlib.Path]
  names: list[str]  # Attribute names, from the CSV header.
  labels: np.ndarray  # float32 (N, A) of 0 and 1.


def _parse_label(value: str, csv_path: pathlib.Path, line: int, name: str) -> float:
  # CelebA's list_attr_celeba.txt writes negatives as -1, so -1 is read as 0.
  if value.strip() in ('1',):
    return 1.0
  if value.strip() in ('0', '-1'):
    return 0.0
  raise ValueError(
    f'{csv_path} line {line}: attribute {name!r} has the value {value!r}; labels must be 0 or 1 '
    '(or -1 for 0).'
  )


def read_labels_csv(
  csv_path: str | pathlib.Path, image_root: str | pathlib.Path | None = None
) -> AttributeLabels:
  """Read a CSV whose header is `file,ATTRIBUTE,...` and whose rows are `name.jpg,0,1,...`.

  File names are relative to `image_root` (default: the CSV's folder). Raises FileNotFoundError
  naming the missing files when any listed image does not exist, and ValueError for a malformed
  CSV, so that no traversal starts on partial labels.
  """
  csv_path = pathlib.Path(csv_path)
  if not csv_path.is_file():
    raise FileNotFoundError(f'labels file {csv_path} not found; pass --labels=FILE.csv.')
  root = pathlib.Path(image_root) if image_root is not None else csv_path.parent
  with csv_path.open(newline='') as handle:
    rows = list(csv.reader(handle))
  if not rows or len(rows[0]) < 2:
    raise ValueError(
      f'{csv_path} needs a header row `file,ATTRIBUTE[,ATTRIBUTE...]` with at least one attribute.'
    )
  names = [name.strip() for name in rows[0][1:]]
  paths, labels, missing = [], [], []
  for line, row in enumerate(rows[1:], start=2):
    if not row:
      continue
    if len(row) != len(names) + 1:
      raise ValueError(
        f'{csv_path} line {line} has {len(row)} columns; the header has {len(names) + 1}.'
      )
    path = root / row[0].strip()
    if not path.is_file():
      missing.append(str(path))
    paths.append(path)
    labels.append([_parse_label(v, csv_path, line, n) for v, n in zip(row[1:], names, strict=True)])
  if missing:
    listed = ', '.join(missing[:MAX_LISTED_MISSING])
    raise FileNotFoundError(
      f'{len(missing)} of {len(paths)} images listed in {csv_path} not found under {root} '
      f'(e.g. {listed}); fix the file names or pass --image_root=FOLDER.'
    )
  if not paths:
    raise ValueError(f'{csv_path} lists no images below its header.')
  return AttributeLabels(paths, names, np.asarray(labels, np.float32))


class ImageClassifier(nn.Module):
  """ResNet18 on images in [-1, 1] with one logit per attribute."""

  num_attributes: int
  stem: str = 'cifar'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return nn.Dense(self.num_attributes)(ResNet18(stem=self.stem)(x, train))


class FeatureClassifier(nn.Module):
  """Linear probe on F's features with one logit per attribute."""

  num_attributes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return nn.Dense(self.num_attributes)(x)


@dataclasses.dataclass(frozen=True)
class AttributeClassifier:
  """A trained multi-label classifier: kind 'resnet18' takes images, 'linear' takes F(x)."""

  kind: str
  module: nn.Module
  variables: dict[str, Any]
  final_loss: float  # Mean binary cross-entropy of the last training step.

  def probabilities(
    self, model: api.OpenGan, images: np.ndarray, batch_size: int = api.DEFAULT_BATCH_SIZE
  ) -> np.ndarray:
    """Return P(attribute present), float32 (N, A), for images (N, R, R, 3) in [-1, 1]."""
    inputs = api.encode(model, images, batch_size) if self.kind == 'linear' else images
    predict = jax.jit(lambda variables, x: self.module.apply(variables, x, train=False))
    logits = api.apply_in_batches(predict, self.variables, [inputs], batch_size)
    return np.asarray(jax.nn.sigmoid(logits))


def train_classifier(
  model: api.OpenGan,
  labels: AttributeLabels,
  kind: str = 'resnet18',
  num_steps: int = 500,
  batch_size: int = 32,
  learning_rate: float = 1e-3,
  seed: int = 0,
) -> AttributeClassifier:
  """Train a multi-label classifier with binary cross-entropy on labelled real images.

  kind='resnet18' is the classifier of the OpenGAN paper's method: a ResNet18 trained from scratch on the
  pixels at the GAN resolution, with no flips because a flip swaps left- and right-facing pose.
  It is trained on the whole image, including pose, which F is trained to discard, so it can label
  pose; it is slow on a CPU. kind='linear' is a logistic-regression probe on F's features: fast and
  good for attributes that F encodes, but it cannot label what F ignores (typically pose), so a
  pose direction from it is unreliable.
  """
  if kind not in CLASSIFIERS:
    raise ValueError(f'classifier {kind!r} is invalid: use one of {", ".join(CLASSIFIERS)}.')
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps} must be at least 1.')
  images = api.load_images(labels.paths, model.resolution)
  num_attributes = labels.labels.shape[1]
  if kind == 'linear':
    module = FeatureClassifier(num_attributes)
    inputs = api.encode(model, images)
  else:
    module = ImageClassifier(num_attributes, stem='cifar' if model.resolution <= 64 else 'imagenet')
    inputs = images
  batch_size = min(batch_size, len(inputs))
  variables = module.init(jax.random.PRNGKey(seed), jnp.asarray(inputs[:1]), train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, mutated = module.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
      )
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(), mutated

    (loss, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), mutated.get('batch_stats', {}), opt_state, loss

  rng = np.random.default_rng(seed)
  loss = np.nan
  for index in range(num_steps):
    rows = rng.choice(len(inputs), batch_size, replace=False)
    params, batch_stats, opt_state, loss = step(
      params, batch_stats, opt_state, inputs[rows], labels.labels[rows]
    )
    if (index + 1) % 100 == 0:
      logging.info('Classifier step %d of %d: BCE %.4f.', index + 1, num_steps, float(loss))
  final = {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}
  return AttributeClassifier(kind, module, jax.device_get(final), float(loss))


@dataclasses.dataclass(frozen=True)
class Directions:
  """Mean latent and feature of the generated samples labelled positive and negative."""

  names: list[str]
  latent_positive: np.ndarray  # float32 (A, Z)
  latent_negative: np.ndarray  # float32 (A, Z)
  feature_positive: np.ndarray  # float32 (A, D)
  feature_negative: np.ndarray  # float32 (A, D)
  num_positive: np.ndarray  # int (A,): generated samples labelled positive.

  def unit(self, space: str) -> np.ndarray:
    """Return unit vectors (A, Z or D) pointing from the negative to the positive mean."""
    difference = self.difference(space)
    return difference / np.linalg.norm(difference, axis=1, keepdims=True)

  def difference(self, space: str) -> np.ndarray:
    """Return positive mean minus negative mean in 'latent' or 'feature' space."""
    if space == 'latent':
      return self.latent_positive - self.latent_negative
    if space == 'feature':
      return self.feature_positive - self.feature_negative
    raise ValueError(f"space={space!r} is invalid: use 'latent' or 'feature'.")


def compute_directions(
  model: api.OpenGan,
  classifier: AttributeClassifier,
  names: Sequence[str],
  features: np.ndarray,
  num_samples: int,
  seed: int = 0,
  batch_size: int = api.DEFAULT_BATCH_SIZE,
) -> Directions:
  """Label `num_samples` generated images and average their latents and features per group.

  Sample i uses latent i of `api.sample_latents(model, num_samples, seed)` and the real feature
  `features[i % len(features)]`. A sample is positive for an attribute when the classifier gives
  it a probability of at least 0.5. Raises ValueError when a group of an attribute is empty.
  """
  latents = api.sample_latents(model, num_samples, seed)
  conditions = np.asarray(features, np.float32)[np.arange(num_samples) % len(features)]
  images = api.generate(model, latents, conditions, batch_size)
  positive = classifier.probabilities(model, images, batch_size) >= 0.5
  counts = positive.sum(axis=0)
  for name, count in zip(names, counts, strict=True):
    if count == 0 or count == num_samples:
      group = 'negative' if count else 'positive'
      raise ValueError(
        f'no generated sample of {num_samples} was labelled {group} for attribute {name!r}; '
        'generate more samples (--num_generated), train the classifier longer, or drop the '
        'attribute.'
      )
  logging.info(
    'Positive samples per attribute: %s.', dict(zip(names, counts.tolist(), strict=True))
  )

  def group_means(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.stack([values[positive[:, a]].mean(0) for a in range(len(names))])
    neg = np.stack([values[~positive[:, a]].mean(0) for a in range(len(names))])
    return pos.astype(np.float32), neg.astype(np.float32)

  latent_positive, latent_negative = group_means(latents)
  feature_positive, feature_negative = group_means(conditions)
  return Directions(
    list(names), latent_positive, latent_negative, feature_positive, feature_negative, counts
  )


def traversal(
  model: api.OpenGan,
  directions: Directions,
  latent: np.ndarray,
  feature: np.ndarray,
  scales: Sequence[float],
  batch_size: int = api.DEFAULT_BATCH_SIZE,
) -> np.ndarray:
  """Move one generated image G(latent, feature) along every attribute direction.

  Row 2a moves the latent and row 2a + 1 moves the feature of attribute a. Column j adds
  scales[j] * (positive mean - negative mean): the unit direction scaled by the distance between
  the two means, so scale 1 spans the whole gap. Returns tiles (2A, len(scales)).
  """
  scales = np.asarray(scales, np.float32)
  latent_steps = directions.difference('latent')[:, None] * scales[None, :, None]
  feature_steps = directions.difference('feature')[:, None] * scales[None, :, None]
  num_attributes, num_scales = len(directions.names), len(scales)
  latents, features = [], []
  for a in range(num_attributes):
    latents += [latent + latent_steps[a], np.tile(latent, (num_scales, 1))]
    features += [np.tile(feature, (num_scales, 1)), feature + feature_steps[a]]
  samples = api.generate(model, np.concatenate(latents), np.concatenate(features), batch_size)
  return samples.reshape((2 * num_attributes, num_scales) + samples.shape[1:])

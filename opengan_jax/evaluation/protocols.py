"""Sample-quality and open-set figures of a trained GAN, in the feature space of an evaluator.

Every distance is computed on the evaluator's penultimate features (a feature space labelled
like 'evaluator-32px-256d'), never on Inception features, so none of them is an FID.

Real images and sample counts. The real images of a protocol's classes (the training classes, or
the novel classes) are permuted with the seed and cut into two disjoint halves A and B of
n = min(num_samples, number of real images // 2) images each. The generated set has n images,
one per image of B, with B's class labels. It is compared against A. The real-versus-real
reference compares B itself against A, so both figures use the same n against n images.

Protocols (Table 1 of Ditria, Meyer and Drummond 2020, "OpenGAN: Open Set Generative Adversarial
Networks"), by the workdir's model.conditioning:
  'feature' (OpenGAN):
    T-SM: f drawn from a Gaussian of F's features of the real images of B's training class.
    N-SM: the same on the novel classes.
    N-RF: f = F(b), the feature of the real novel image b of B itself.
  'class' (C-SAGAN): T, the class labels of B. 'none' (U-SAGAN): T, unconditional samples
  compared against the training-class real images, without intra-class figures.
The class Gaussians use the class's per-dimension variance ('diagonal', the default) or its full
sample covariance ('full'), both fitted on all real images of the class.

Figures per protocol: Frechet distance and KID (overall), intra-class Frechet distance (the mean
over classes of the distance between the generated and real images of each class, as the
intra-class FID of Miyato and Koyama 2018), precision and recall (k = 3), each next to its
real-versus-real reference.

Open-set figures (OpenGAN only):
  feature consistency: mean cosine similarity and mean squared distance (summed over dimensions)
    between F(G(z, f)) and f, for f = F(b) with b in B of the training and of the novel classes.
  one-shot accuracy: the fraction of the N-RF samples that the evaluator's classifier assigns to
    their source's class, by argmax over all its classes and over the novel classes only. The same
    fraction for the real source images is given for reference. That reference is optimistic,
    because the evaluator was trained on most of the real images of every class.
  latent/feature split (section 5.6 of the OpenGAN paper): see `latent_feature_split`.
"""

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from opengan_jax import config_checks, gan, input_pipeline, parallel
from opengan_jax.evaluation import distances
from opengan_jax.evaluation import evaluator as evaluator_lib

COVARIANCES = ('diagonal', 'full')
PROTOCOLS = ('T-SM', 'N-SM', 'N-RF', 'T')
SUBSETS = ('train', 'novel')
DISTANCE_KEYS = (
  'frechet_distance',
  'kid_mean',
  'kid_std',
  'intra_class_frechet_distance',
  'precision',
  'recall',
)
PRECISION_RECALL_K = 3
KID_SUBSET_SIZE = 1000
# Random streams of one seed, so each draw is independent of the others.
HALVES_STREAM = 0
LATENT_STREAM = 1
FEATURE_STREAM = 2
GRID_STREAM = 3


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
  """Sample counts and seeds of one evaluation."""

  num_samples: int = 5000  # Maximum n per protocol (see the module docstring).
  batch_size: int = 256  # Images per forward pass of G, F and the evaluator.
  seed: int = 0  # Seed of the halves, latents, sampled features and KID subsets.
  covariance: str = 'diagonal'  # Class Gaussians of T-SM and N-SM: 'diagonal' or 'full'.
  grid_sources: int = 16  # S of the latent/feature split grid.
  grid_latents: int = 16  # L of the latent/feature split grid.

  def check(self) -> None:
    """Raise ValueError naming the first invalid option."""
    for name in ('num_samples', 'batch_size', 'grid_sources', 'grid_latents'):
      if getattr(self, name) < 2:
        raise ValueError(f'{name}={getattr(self, name)} must be at least 2.')
    if self.covariance not in COVARIANCES:
      raise ValueError(f'covariance={self.covariance!r} is invalid: use one of {COVARIANCES}.')


@dataclasses.dataclass(frozen=True)
class GanUnderEvaluation:
  """The pieces of a trained GAN that an evaluation needs, restored or taken from training."""

  conditioning: str  # 'feature', 'class' or 'none'.
  resolution: int
  z_dim: int
  step: int
  generator_variables: Any
  generate_fn: Callable[[Any, jax.Array, Any], jax.Array]  # Jitted (variables, z, cond).
  split: input_pipeline.ClassSplit  # Real images at `resolution`.
  extractor_variables: Any = None  # F's variables ('feature' only).
  encode_fn: Callable[[Any, jax.Array], jax.Array] | None = None  # Jitted (variables, images).


def make_gan_under_evaluation(
  config: ml_collections.ConfigDict,
  generator,
  generator_variables: Any,
  step: int,
  split: input_pipeline.ClassSplit,
  extractor=None,
  extractor_variables: Any = None,
) -> GanUnderEvaluation:
  """Bundle G (and F for feature conditioning) with jitted generate and encode functions."""
  encode_fn = None
  if config.model.conditioning == 'feature':
    image_size = config_checks.extractor_image_size(config)
    extractor = extractor.clone(axis_name=None)
    encode_fn = jax.jit(
      lambda variables, images: gan.extract_features(extractor, variables, images, image_size)
    )
  return GanUnderEvaluation(
    conditioning=config.model.conditioning,
    resolution=int(config.resolution),
    z_dim=int(config.model.z_dim),
    step=int(step),
    generator_variables=jax.device_get(generator_variables),
    generate_fn=gan.make_generate_fn(generator),
    split=split,
    extractor_variables=None if encode_fn is None else jax.device_get(extractor_variables),
    encode_fn=encode_fn,
  )


# --------------------------------------------------------------------------------------------------
# Pure pieces: halves, class Gaussians, distances, open-set figures.


def split_halves(num_rows: int, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Return two disjoint random index sets A and B of `num` rows each out of `num_rows`."""
  if not 0 < 2 * num <= num_rows:
    raise ValueError(f'cannot draw two disjoint halves of {num} rows from {num_rows} rows.')
  order = np.random.default_rng([seed, HALVES_STREAM]).permutation(num_rows)
  return order[:num], order[num : 2 * num]


def sample_class_features(
  features: np.ndarray,
  labels: np.ndarray,
  sample_labels: np.ndarray,
  covariance: str,
  seed: int,
  stream: int = 0,
) -> np.ndarray:
  """Draw one feature per entry of `sample_labels` from a Gaussian of that class's features.

  The Gaussian of class c has the mean of the rows of `features` labelled c and, with
  covariance='diagonal', their per-dimension unbiased variance; with 'full', their full unbiased
  sample covariance. Full samples are mean + g @ (rows - mean) / sqrt(m - 1) with g ~ N(0, I_m)
  for the m rows of the class, which has exactly that covariance even when m < D.
  The draws are a function of (seed, stream). Returns float32 (len(sample_labels), D).
  """
  if covariance not in COVARIANCES:
    raise ValueError(f'covariance={covariance!r} is invalid: use one of {COVARIANCES}.')
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  sample_labels = np.asarray(sample_labels)
  rng = np.random.default_rng([seed, FEATURE_STREAM, stream])
  samples = np.empty((len(sample_labels), features.shape[1]), np.float64)
  for label in np.unique(sample_labels):
    rows = features[labels == label]
    if len(rows) < 2:
      raise ValueError(
        f'class {label} has {len(rows)} real images; a class Gaussian needs at least 2.'
      )
    targets = np.flatnonzero(sample_labels == label)
    mean = rows.mean(axis=0)
    if covariance == 'diagonal':
      noise = rng.standard_normal((len(targets), features.shape[1]))
      samples[targets] = mean + noise * rows.std(axis=0, ddof=1)
    else:
      weights = rng.standard_normal((len(targets), len(rows)))
      samples[targets] = mean + weights @ (rows - mean) / np.sqrt(len(rows) - 1)
  return samples.astype(np.float32)


def intra_class_frechet_distance(
  fake: np.ndarray, fake_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray
) -> tuple[float | None, int]:
  """Return (mean over classes of the per-class Frechet distance, number of classes used).

  Classes with fewer than 2 rows on either side are skipped; (None, 0) when none is left.
  """
  values = []
  for label in np.unique(real_labels):
    fake_rows = fake[fake_labels == label]
    real_rows = real[real_labels == label]
    if len(fake_rows) >= 2 and len(real_rows) >= 2:
      values.append(distances.frechet_distance(fake_rows, real_rows))
  if not values:
    return None, 0
  return float(np.mean(values)), len(values)


def compare_features(
  fake: np.ndarray,
  fake_labels: np.ndarray | None,
  real: np.ndarray,
  real_labels: np.ndarray,
  seed: int,
  real_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
  """Return every distance between fake and real features (see DISTANCE_KEYS).

  fake_labels None: no intra-class figure (its entries are None). `real_stats` is the
  precomputed (mean, covariance) of `real`.
  """
  real_stats = distances.gaussian_stats(real) if real_stats is None else real_stats
  fake_mean, fake_cov = distances.gaussian_stats(fake)
  kid_mean, kid_std = distances.kernel_distance(
    fake, real, subset_size=min(KID_SUBSET_SIZE, len(fake), len(real)), seed=seed
  )
  k = min(PRECISION_RECALL_K, len(fake) - 1, len(real) - 1)
  precision, recall = distances.precision_recall(real, fake, k=k)
  intra, intra_classes = None, 0
  if fake_labels is not None:
    intra, intra_classes = intra_class_frechet_distance(fake, fake_labels, real, real_labels)
  return {
    'frechet_distance': float(
      distances.frechet_distance_from_stats(fake_mean, fake_cov, *real_stats)
    ),
    'kid_mean': float(kid_mean),
    'kid_std': float(kid_std),
    'intra_class_frechet_distance': intra,
    'intra_class_num_classes': intra_classes,
    'precision': float(precision),
    'recall': float(recall),
    'precision_recall_k': int(k),
  }


def feature_consistency(generated: np.ndarray, sources: np.ndarray) -> dict[str, float]:
  """Return the mean cosine similarity and squared distance between rows of two (N, D) arrays.

  The squared distance is summed over dimensions, as in the G loss ||F(G(z, f)) - f||^2.
  """
  generated = np.asarray(generated, np.float64)
  sources = np.asarray(sources, np.float64)
  if generated.shape != sources.shape or generated.ndim != 2:
    raise ValueError(
      f'expected two (N, D) arrays of one shape, got {generated.shape} and {sources.shape}.'
    )
  norms = np.linalg.norm(generated, axis=1) * np.linalg.norm(sources, axis=1)
  cosine = np.sum(generated * sources, axis=1) / np.maximum(norms, 1e-12)
  squared = np.sum(np.square(generated - sources), axis=1)
  return {'cosine_similarity': float(np.mean(cosine)), 'squared_distance': float(np.mean(squared))}


def latent_feature_split(grid_features: np.ndarray) -> dict[str, float]:
  """Measure how much of the evaluator's features varies with z compared with f.

  grid_features: (S, L, D) evaluator features of G(z_l, f_s) over S sources and L latents.
    latent_variance = mean over s of sum over d of Var_l(E[s, l, d])  (z varies, f fixed)
    feature_variance = mean over l of sum over d of Var_s(E[s, l, d])  (f varies, z fixed)
    ratio = latent_variance / feature_variance
  The variances are unbiased (divided by L - 1 and S - 1). A ratio well below 1 means that the
  class-discriminative content of the samples follows f rather than z, the split that section
  5.6 of the OpenGAN paper shows in figures.
  """
  grid_features = np.asarray(grid_features, np.float64)
  if grid_features.ndim != 3 or min(grid_features.shape[:2]) < 2:
    raise ValueError(f'expected (S, L, D) features with S, L >= 2, got {grid_features.shape}.')
  latent = float(np.mean(np.sum(np.var(grid_features, axis=1, ddof=1), axis=-1)))
  feature = float(np.mean(np.sum(np.var(grid_features, axis=0, ddof=1), axis=-1)))
  return {
    'latent_variance': latent,
    'feature_variance': feature,
    'latent_feature_variance_ratio': latent / feature if feature > 0 else None,
  }


def one_shot_accuracy(
  logits: np.ndarray, targets: np.ndarray, candidates: Sequence[int]
) -> dict[str, float]:
  """Return the fraction of rows classified as their target class.

  accuracy_all: argmax over every class. accuracy_novel: argmax over `candidates` only (the
  evaluator indices of the novel classes). `targets` are evaluator class indices.
  """
  logits = np.asarray(logits)
  targets = np.asarray(targets)
  candidates = np.asarray(candidates)
  restricted = candidates[np.argmax(logits[:, candidates], axis=1)]
  return {
    'accuracy_all': float(np.mean(np.argmax(logits, axis=1) == targets)),
    'accuracy_novel': float(np.mean(restricted == targets)),
  }


# --------------------------------------------------------------------------------------------------
# Running the GAN, F and the evaluator over batches.


class _Networks:
  """G, F and the evaluator with their variables replicated over the evaluator's mesh."""

  def __init__(self, model: GanUnderEvaluation, evaluator: evaluator_lib.Evaluator, batch: int):
    self.model = model
    self.evaluator = evaluator
    self.batch_size = batch
    self.mesh = evaluator.mesh
    self.variables = parallel.replicate(
      {
        'generator': model.generator_variables,
        'extractor': model.extractor_variables,
        'evaluator': evaluator.variables,
      },
      self.mesh,
    )
    encode_fn, apply_fn, generate_fn = model.encode_fn, evaluator.apply_fn, model.generate_fn

    @jax.jit
    def sample(variables, latents, cond):
      images = generate_fn(variables['generator'], latents, cond)
      features, logits = apply_fn(variables['evaluator'], images)
      outputs = {'features': features, 'logits': logits}
      if encode_fn is not None:
        outputs['extractor_features'] = encode_fn(variables['extractor'], images)
      return outputs

    self._sample = sample
    self._encode = encode_fn

  def generate(self, latents: np.ndarray, cond: np.ndarray) -> dict[str, np.ndarray]:
    """Return evaluator features, logits (and F features) of G(latents, cond), not the images."""
    return evaluator_lib.run_batched(
      self._sample, self.variables, [latents, cond], self.batch_size, self.mesh
    )

  def encode(self, images_uint8: np.ndarray) -> np.ndarray:
    """Return F's features of real uint8 images."""
    return evaluator_lib.run_batched(
      lambda variables, images: self._encode(variables['extractor'], images),
      self.variables,
      [images_uint8],
      self.batch_size,
      self.mesh,
      evaluator_lib.to_float_images,
    )

  def latents(self, num: int, seed: int, stream: int) -> np.ndarray:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), LATENT_STREAM), stream)
    return np.asarray(jax.random.normal(key, (num, self.model.z_dim)), np.float32)


def _not_applicable(reason: str) -> dict[str, Any]:
  return {'applicable': False, 'reason': reason}


@dataclasses.dataclass
class _RealSubset:
  """Real images of one subset: evaluator features, logits, labels and the halves A and B."""

  name: str
  labels: np.ndarray
  features: np.ndarray
  logits: np.ndarray
  half_a: np.ndarray
  half_b: np.ndarray
  real_stats: tuple[np.ndarray, np.ndarray]
  reference: dict[str, Any]


def _real_subset(
  name: str, images: np.ndarray, labels: np.ndarray, evaluator, options: EvaluationOptions
) -> _RealSubset | None:
  num = min(options.num_samples, len(images) // 2)
  if num < PRECISION_RECALL_K + 1:
    return None
  features, logits = evaluator.features_and_logits(images, options.batch_size)
  half_a, half_b = split_halves(len(images), num, options.seed)
  real_stats = distances.gaussian_stats(features[half_a])
  reference = compare_features(
    features[half_b], labels[half_b], features[half_a], labels[half_a], options.seed, real_stats
  )
  return _RealSubset(name, labels, features, logits, half_a, half_b, real_stats, reference)


def _protocol_entry(
  real: _RealSubset,
  generated: dict[str, np.ndarray],
  labelled: bool,
  feature_space: str,
  options: EvaluationOptions,
) -> dict[str, Any]:
  a, b = real.half_a, real.half_b
  result = compare_features(
    generated['features'],
    real.labels[b] if labelled else None,
    real.features[a],
    real.labels[a],
    options.seed,
    real.real_stats,
  )
  reference = dict(real.reference)
  if not labelled:
    reference['intra_class_frechet_distance'] = None
    reference['intra_class_num_classes'] = 0
  return {
    'applicable': True,
    'feature_space': feature_space,
    'classes': real.name,
    'num_generated': len(b),
    'num_real': len(a),
    **result,
    'reference': {'num_real_b': len(b), **reference},
  }


def _evaluator_indices(evaluator: evaluator_lib.Evaluator, names: Sequence[str]) -> np.ndarray:
  known = {name: index for index, name in enumerate(evaluator.class_names)}
  missing = [name for name in names if name not in known]
  if missing:
    raise ValueError(
      f'the evaluator in {evaluator.directory} has no class named {missing[0]!r} '
      f"({len(missing)} of the GAN's classes are missing): train the evaluator on the dataset "
      'of the GAN workdir.'
    )
  return np.asarray([known[name] for name in names], np.int32)


def _grid(
  networks: _Networks, features: np.ndarray, options: EvaluationOptions, stream: int
) -> dict[str, float]:
  sources = features[: options.grid_sources]
  latents = networks.latents(options.grid_latents, options.seed, stream)
  num_sources, num_latents = len(sources), len(latents)
  cond = np.repeat(sources, num_latents, axis=0)
  grid = networks.generate(np.tile(latents, (num_sources, 1)), cond)['features']
  result = latent_feature_split(grid.reshape(num_sources, num_latents, -1))
  return {'num_sources': num_sources, 'num_latents': num_latents, **result}


def _feature_protocols(
  networks: _Networks,
  reals: dict[str, _RealSubset],
  evaluator: evaluator_lib.Evaluator,
  options: EvaluationOptions,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Run T-SM, N-SM and N-RF and the open-set figures of a feature-conditional GAN."""
  split = networks.model.split
  images = {'train': split.train_images, 'novel': split.novel_images}
  extractor_features = {}
  protocols, open_set = {}, {'consistency': {}, 'latent_feature_split': {}}
  for stream, (name, subset) in enumerate((('T-SM', 'train'), ('N-SM', 'novel'))):
    real = reals.get(subset)
    if real is None:
      protocols[name] = _not_applicable(f'fewer than {2 * (PRECISION_RECALL_K + 1)} real images')
      continue
    extractor_features[subset] = networks.encode(images[subset])
    cond = sample_class_features(
      extractor_features[subset],
      real.labels,
      real.labels[real.half_b],
      options.covariance,
      options.seed,
      stream,
    )
    generated = networks.generate(networks.latents(len(cond), options.seed, stream), cond)
    protocols[name] = _protocol_entry(real, generated, True, evaluator.feature_space, options)
    protocols[name]['covariance'] = options.covariance

  for stream, subset in enumerate(SUBSETS, start=2):
    real = reals.get(subset)
    if real is None:
      continue
    sources = extractor_features[subset][real.half_b]
    generated = networks.generate(networks.latents(len(sources), options.seed, stream), sources)
    open_set['consistency'][subset] = {
      'feature_space': 'extractor F',
      'num_sources': len(sources),
      **feature_consistency(generated['extractor_features'], sources),
    }
    open_set['latent_feature_split'][subset] = {
      'feature_space': evaluator.feature_space,
      **_grid(networks, sources, options, GRID_STREAM + stream),
    }
    if subset == 'novel':
      protocols['N-RF'] = _protocol_entry(real, generated, True, evaluator.feature_space, options)
      novel = _evaluator_indices(evaluator, split.novel_class_names)
      targets = novel[real.labels[real.half_b]]
      open_set['one_shot'] = {
        'feature_space': evaluator.feature_space,
        'num_sources': len(sources),
        **one_shot_accuracy(generated['logits'], targets, novel),
        'real_sources': one_shot_accuracy(real.logits[real.half_b], targets, novel),
      }
  if 'N-RF' not in protocols:
    protocols['N-RF'] = _not_applicable('too few real novel-class images')
  protocols['T'] = _not_applicable("protocol of the baselines: conditioning 'class' or 'none'")
  return protocols, open_set


def _baseline_protocols(
  networks: _Networks,
  reals: dict[str, _RealSubset],
  evaluator: evaluator_lib.Evaluator,
  options: EvaluationOptions,
) -> dict[str, Any]:
  """Run protocol T of a class-conditional or unconditional GAN."""
  conditioning = networks.model.conditioning
  reason = f"conditioning {conditioning!r} has no feature input (OpenGAN 'feature' only)"
  protocols = {name: _not_applicable(reason) for name in ('T-SM', 'N-SM', 'N-RF')}
  real = reals.get('train')
  if real is None:
    protocols['T'] = _not_applicable('too few real training-class images')
    return protocols
  labelled = conditioning == 'class'
  cond = real.labels[real.half_b].astype(np.int32)
  if not labelled:
    cond = np.zeros_like(cond)  # Ignored by an unconditional G.
  generated = networks.generate(networks.latents(len(cond), options.seed, 0), cond)
  protocols['T'] = _protocol_entry(real, generated, labelled, evaluator.feature_space, options)
  return protocols


def evaluate(
  model: GanUnderEvaluation,
  evaluator: evaluator_lib.Evaluator,
  options: EvaluationOptions = EvaluationOptions(),
) -> dict[str, Any]:
  """Compute every figure of the module docstring; return the report as a JSON-ready dict.

  Raises ValueError when the evaluator's resolution differs from the GAN's, or when the evaluator
  lacks a class of the GAN's dataset (needed for one-shot accuracy).
  """
  options.check()
  if evaluator.resolution != model.resolution:
    raise ValueError(
      f'the evaluator in {evaluator.directory} was trained at {evaluator.resolution} px, but the '
      f'GAN generates {model.resolution} px images. Train an evaluator at the GAN resolution '
      f'(--config.resolution={model.resolution}) and pass its directory.'
    )
  start = time.perf_counter()
  split = model.split
  networks = _Networks(model, evaluator, options.batch_size)
  reals = {}
  for subset, images, labels in (
    ('train', split.train_images, split.train_labels),
    ('novel', split.novel_images, split.novel_labels),
  ):
    real = _real_subset(subset, images, labels, evaluator, options)
    if real is not None:
      reals[subset] = real

  open_set = None
  if model.conditioning == 'feature':
    protocols, open_set = _feature_protocols(networks, reals, evaluator, options)
  else:
    protocols = _baseline_protocols(networks, reals, evaluator, options)
  report = {
    'step': model.step,
    'conditioning': model.conditioning,
    'resolution': model.resolution,
    'feature_space': evaluator.feature_space,
    'evaluator': {
      'directory': str(evaluator.directory),
      'held_out_accuracy': evaluator.info.get('held_out_accuracy'),
      'num_classes': len(evaluator.class_names),
      'feature_dim': evaluator.feature_dim,
    },
    'options': dataclasses.asdict(options),
    'num_real_images': {'train': len(split.train_images), 'novel': len(split.novel_images)},
    'protocols': protocols,
    'open_set': open_set,
  }
  report['wall_time_s'] = time.perf_counter() - start
  return report


# --------------------------------------------------------------------------------------------------
# Output: JSON, TensorBoard scalars and a log table.


def report_scalars(report: dict[str, Any]) -> dict[str, float]:
  """Flatten the numeric figures into TensorBoard tags under 'eval/'."""
  space = report['feature_space']
  scalars = {}
  for name, entry in report['protocols'].items():
    if not entry['applicable']:
      continue
    for key in DISTANCE_KEYS:
      for tag, value in ((key, entry[key]), (f'reference_{key}', entry['reference'][key])):
        if value is not None:
          scalars[f'eval/{space}/{name}/{tag}'] = float(value)
  open_set = report['open_set'] or {}
  for subset, values in open_set.get('consistency', {}).items():
    for key in ('cosine_similarity', 'squared_distance'):
      scalars[f'eval/extractor_F/{subset}/feature_{key}'] = values[key]
  for subset, values in open_set.get('latent_feature_split', {}).items():
    for key in ('latent_variance', 'feature_variance', 'latent_feature_variance_ratio'):
      if values[key] is not None:
        scalars[f'eval/{space}/{subset}/{key}'] = values[key]
  if 'one_shot' in open_set:
    for key in ('accuracy_all', 'accuracy_novel'):
      scalars[f'eval/{space}/one_shot_{key}'] = open_set['one_shot'][key]
  return scalars


def _cell(value: float | None, scale: float = 1.0) -> str:
  return 'N/A' if value is None else f'{value * scale:.4g}'


def format_table(report: dict[str, Any]) -> str:
  """Return the protocol figures as a text table, each with its real-versus-real reference."""
  lines = [
    f'GAN step {report["step"]} ({report["conditioning"]}), feature space '
    f'{report["feature_space"]}, seed {report["options"]["seed"]}. Each cell: generated '
    '(real-vs-real reference). KID x 1000.',
    f'{"protocol":8} {"n":>5}  {"frechet":>17}  {"KID":>17}  {"intra frechet":>17}  '
    f'{"precision":>13}  {"recall":>13}',
  ]
  for name, entry in report['protocols'].items():
    if not entry['applicable']:
      lines.append(f'{name:8} N/A: {entry["reason"]}')
      continue
    reference = entry['reference']
    cells = []
    for key, scale, width in (
      ('frechet_distance', 1.0, 17),
      ('kid_mean', 1000.0, 17),
      ('intra_class_frechet_distance', 1.0, 17),
      ('precision', 1.0, 13),
      ('recall', 1.0, 13),
    ):
      text = f'{_cell(entry[key], scale)} ({_cell(reference[key], scale)})'
      cells.append(f'{text:>{width}}')
    lines.append(f'{name:8} {entry["num_generated"]:>5}  ' + '  '.join(cells))
  open_set = report['open_set']
  if open_set:
    for subset, values in open_set['consistency'].items():
      lines.append(
        f'F consistency ({subset} sources): cosine {values["cosine_similarity"]:.4f}, '
        f'squared distance {values["squared_distance"]:.4f}'
      )
    if 'one_shot' in open_set:
      one_shot = open_set['one_shot']
      lines.append(
        f'one-shot accuracy: {one_shot["accuracy_all"]:.4f} (all classes), '
        f'{one_shot["accuracy_novel"]:.4f} (novel classes); real sources '
        f'{one_shot["real_sources"]["accuracy_all"]:.4f}, '
        f'{one_shot["real_sources"]["accuracy_novel"]:.4f}'
      )
    for subset, values in open_set['latent_feature_split'].items():
      lines.append(
        f'latent/feature variance ({subset}, {values["num_sources"]}x{values["num_latents"]}): '
        f'{_cell(values["latent_variance"])} / {_cell(values["feature_variance"])} = '
        f'{_cell(values["latent_feature_variance_ratio"])}'
      )
  lines.append(f'wall time {report["wall_time_s"]:.1f} s')
  return '\n'.join(lines)


def write_report(report: dict[str, Any], workdir: str | pathlib.Path, writer=None) -> pathlib.Path:
  """Write WORKDIR/eval/report_<step>.json and, with a clu writer, the scalars; log the table."""
  path = pathlib.Path(workdir) / 'eval' / f'report_{report["step"]}.json'
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
  if writer is not None:
    writer.write_scalars(report['step'], report_scalars(report))
    writer.flush()
  logging.info('Evaluation written to %s:\n%s', path, format_table(report))
  return path


class TrainingEvaluation:
  """The evaluation run every config.eval_every_steps GAN steps during training."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    split: input_pipeline.ClassSplit,
    generator,
    extractor=None,
    extractor_variables: Any = None,
  ):
    self.config = config
    self.split = split
    self.generator = generator
    self.extractor = extractor
    self.extractor_variables = extractor_variables
    # Restored now, so a missing or mismatched evaluator stops the run before any GAN step.
    self.evaluator = evaluator_lib.restore_evaluator(
      config.evaluator_dir, expected_resolution=config.resolution
    )
    self.options = EvaluationOptions(num_samples=config.eval_num_samples, seed=config.seed)

  def run(self, state: gan.GanState, step: int, workdir: str, writer) -> dict[str, Any]:
    """Evaluate G of `state` at `step` and write the report and scalars."""
    model = make_gan_under_evaluation(
      self.config,
      self.generator,
      state.generator.variables(),
      step,
      self.split,
      self.extractor,
      self.extractor_variables,
    )
    report = evaluate(model, self.evaluator, self.options)
    write_report(report, workdir, writer)
    return report

"""t-SNE plots of metric features: real images by class, and real versus generated class means."""

import dataclasses
import pathlib

import matplotlib

matplotlib.use('Agg')  # Files only; no display is needed.

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from opengan_jax.generate import api  # noqa: E402

MAX_PERPLEXITY = 30.0  # scikit-learn's default.


def tsne(points: np.ndarray, seed: int = 0) -> np.ndarray:
  """Embed points (N, D) in 2-D with t-SNE: float32 (N, 2).

  The perplexity is min(30, (N - 1) / 3), because scikit-learn needs it below N and few points
  (e.g. a handful of class means) need a small one.
  """
  points = np.asarray(points, np.float32)
  if len(points) < 3:
    raise ValueError(
      f't-SNE needs at least 3 points, got {len(points)}; pass more images or classes.'
    )
  perplexity = min(MAX_PERPLEXITY, (len(points) - 1) / 3)
  embedding = TSNE(2, perplexity=perplexity, init='pca', random_state=seed)
  return embedding.fit_transform(points).astype(np.float32)


def _class_colours(num_classes: int) -> np.ndarray:
  return plt.get_cmap('tab20' if num_classes > 10 else 'tab10')(np.arange(num_classes) % 20)


def _save_figure(figure, path: str | pathlib.Path) -> pathlib.Path:
  """Write a matplotlib figure as PNG atomically (temporary file, then rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  try:
    figure.savefig(tmp, format='png', dpi=120, bbox_inches='tight')
  finally:
    plt.close(figure)
  tmp.replace(path)
  return path


def plot_classes(
  coordinates: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | pathlib.Path
) -> pathlib.Path:
  """Scatter 2-D points coloured by class, with a legend of class names for up to 20 classes."""
  colours = _class_colours(len(class_names))
  figure, axes = plt.subplots(figsize=(6, 6))
  for label, name in enumerate(class_names):
    rows = labels == label
    axes.scatter(*coordinates[rows].T, s=12, color=colours[label], label=name)
  if len(class_names) <= 20:
    axes.legend(fontsize='small', markerscale=1.5, loc='best')
  axes.set_title('t-SNE of real features')
  axes.set_xticks([])
  axes.set_yticks([])
  return _save_figure(figure, path)


@dataclasses.dataclass(frozen=True)
class ClassMeans:
  """Per-class mean features of real images and of images generated from them."""

  real: np.ndarray  # float32 (C, D)
  generated: np.ndarray  # float32 (C, D)
  class_names: list[str]

  def distances(self) -> np.ndarray:
    """Return the Euclidean distance between the real and the generated mean of each class."""
    return np.linalg.norm(self.real - self.generated, axis=1)


def class_means(
  model: api.OpenGan,
  features: np.ndarray,
  labels: np.ndarray,
  class_names: list[str],
  samples_per_image: int = 1,
  seed: int = 0,
  batch_size: int = api.DEFAULT_BATCH_SIZE,
) -> ClassMeans:
  """Average F(x) of the real images and F(G(z, F(x))) of their samples, per class.

  Each real feature conditions `samples_per_image` samples with latents
  `api.sample_latents(model, N * samples_per_image, seed)`.
  """
  if samples_per_image < 1:
    raise ValueError(f'samples_per_image={samples_per_image} must be at least 1.')
  conditions = np.repeat(features, samples_per_image, axis=0)
  latents = api.sample_latents(model, len(conditions), seed)
  generated_features = api.encode(model, api.generate(model, latents, conditions, batch_size))
  generated_labels = np.repeat(labels, samples_per_image)
  real = np.stack([features[labels == c].mean(0) for c in range(len(class_names))])
  fake = np.stack(
    [generated_features[generated_labels == c].mean(0) for c in range(len(class_names))]
  )
  return ClassMeans(real.astype(np.float32), fake.astype(np.float32), list(class_names))


def plot_class_means(means: ClassMeans, path: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
  """Plot a joint t-SNE of real (circles) and generated (crosses) class means, joined per class."""
  num_classes = len(means.class_names)
  coordinates = tsne(np.concatenate([means.real, means.generated]), seed)
  real, fake = coordinates[:num_classes], coordinates[num_classes:]
  colours = _class_colours(num_classes)
  figure, axes = plt.subplots(figsize=(6, 6))
  for c in range(num_classes):
    axes.plot(*np.stack([real[c], fake[c]]).T, color=colours[c], linewidth=0.8, alpha=0.6)
  axes.scatter(*real.T, s=30, c=colours, marker='o', label='real class mean')
  axes.scatter(*fake.T, s=40, c=colours, marker='x', label='generated class mean')
  axes.legend(fontsize='small', loc='best')
  axes.set_title('t-SNE of per-class mean features')
  axes.set_xticks([])
  axes.set_yticks([])
  return _save_figure(figure, path)

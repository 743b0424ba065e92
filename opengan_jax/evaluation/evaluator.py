"""The evaluator network: a small CNN classifier whose features measure sample quality.

It is trained by `opengan_jax.evaluation.train_evaluator` on every class of a dataset (training
and novel classes, e.g. all 102 Flowers102 classes) at the GAN resolution. Its penultimate layer,
the global average of the last conv block (`widths[-1]` entries, 256 by default), is the feature
space of the Frechet distance, KID and precision/recall figures, and its classifier gives the
one-shot class accuracy. Those figures are comparable only between runs that use the same
evaluator, and they are not FID: the network is not Inception and it was trained on the
dataset itself.

An evaluator directory holds:
  checkpoints/evaluator/<step>/  orbax checkpoint of params, batch_stats, optimiser state, step
  evaluator.json                 classes, resolution, widths, feature size, held-out accuracy
"""

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from opengan_jax import checkpointing, parallel

STAGE = 'evaluator'  # Checkpoint folder name under EVAL_DIR/checkpoints.
INFO_FILE = 'evaluator.json'
DEFAULT_BATCH_SIZE = 256


class EvaluatorNet(nn.Module):
  """Conv blocks (3x3 conv, BatchNorm, ReLU, twice), 2x2 max-pooling between blocks.

  Returns (features, logits): features are the global average of the last block, float32
  (B, widths[-1]); logits are (B, num_classes).
  """

  num_classes: int
  widths: Sequence[int] = (32, 64, 128, 256)
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    x = images
    for block, width in enumerate(self.widths):
      if block > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for _ in range(2):
        x = nn.Conv(width, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
        x = nn.relu(x)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes)(features)
    return features, logits


def feature_space_name(resolution: int, feature_dim: int) -> str:
  """Return the label of the evaluator's feature space, e.g. 'evaluator-32px-256d'."""
  return f'evaluator-{resolution}px-{feature_dim}d'


def to_float_images(images: np.ndarray) -> np.ndarray:
  """Map uint8 images in [0, 255] to float32 in [-1, 1]; float images pass through as float32."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def local_mesh() -> Mesh:
  """Return a one-axis mesh over this process's devices, for batched inference."""
  return parallel.make_mesh(jax.local_devices())


def run_batched(
  fn: Callable[..., Any],
  variables: Any,
  arrays: Sequence[np.ndarray],
  batch_size: int,
  mesh: Mesh,
  prepare: Callable[[np.ndarray], np.ndarray] = np.asarray,
) -> Any:
  """Apply `fn(variables, *rows)` to `batch_size` rows at a time, each batch split over `mesh`.

  `variables` should already be replicated over `mesh`. `prepare` converts each chunk just before
  use. Every chunk is padded (by repeating its last row) to `batch_size` rows, or to the next
  power of two when all rows fit in one batch. That size is rounded up to a multiple of the device
  count, so `fn` compiles for a few shapes only. Returns `fn`'s output tree with the rows of all chunks
  concatenated, as numpy arrays.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be at least 1.')
  total = len(arrays[0])
  if total == 0:
    raise ValueError('no rows to process: pass at least one image, latent or feature.')
  num_devices = mesh.devices.size
  padded_size = batch_size if total > batch_size else 1 << (total - 1).bit_length()
  padded_size = -(-padded_size // num_devices) * num_devices
  sharding = parallel.batch_sharded(mesh)
  outputs = []
  for start in range(0, total, padded_size):
    chunk = [prepare(np.asarray(a[start : start + padded_size])) for a in arrays]
    size = len(chunk[0])
    if size < padded_size:
      chunk = [np.concatenate([c, np.repeat(c[-1:], padded_size - size, axis=0)]) for c in chunk]
    chunk = [jax.device_put(c, sharding) for c in chunk]
    result = jax.device_get(fn(variables, *chunk))
    outputs.append(jax.tree.map(lambda leaf, size=size: np.asarray(leaf)[:size], result))
  return jax.tree.map(lambda *leaves: np.concatenate(leaves), *outputs)


def make_apply_fn(network: EvaluatorNet) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """Return a jitted `(variables, float images) -> (features, logits)` in evaluation mode."""
  network = network.clone(axis_name=None)

  @jax.jit
  def apply(variables, images):
    return network.apply(variables, images, train=False)

  return apply


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A restored evaluator: its network, variables and the facts of evaluator.json."""

  network: EvaluatorNet
  variables: Any  # {'params', 'batch_stats'}, replicated over `mesh`.
  info: dict[str, Any]  # Contents of evaluator.json.
  directory: pathlib.Path
  mesh: Mesh
  apply_fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]

  @property
  def resolution(self) -> int:
    return int(self.info['resolution'])

  @property
  def feature_dim(self) -> int:
    return int(self.info['feature_dim'])

  @property
  def class_names(self) -> list[str]:
    return list(self.info['class_names'])

  @property
  def feature_space(self) -> str:
    """Label of the feature space, e.g. 'evaluator-32px-256d'."""
    return feature_space_name(self.resolution, self.feature_dim)

  def _check_images(self, images: np.ndarray) -> None:
    shape = np.shape(images)
    expected = (self.resolution, self.resolution, 3)
    if len(shape) != 4 or shape[1:] != expected:
      raise ValueError(
        f'the evaluator in {self.directory} takes images of shape (N, {self.resolution}, '
        f'{self.resolution}, 3), got {shape}; resize them to its resolution.'
      )

  def features_and_logits(
    self, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE
  ) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 features (N, feature_dim) and logits (N, num_classes) of images.

    Images are uint8 in [0, 255] or float in [-1, 1], (N, R, R, 3) at the evaluator's resolution.
    """
    self._check_images(images)
    return run_batched(
      self.apply_fn, self.variables, [images], batch_size, self.mesh, to_float_images
    )

  def features(self, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Return the penultimate features, float32 (N, feature_dim), of images."""
    return self.features_and_logits(images, batch_size)[0]

  def predict(self, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Return the predicted class, int32 (N,), an index into `class_names`."""
    logits = self.features_and_logits(images, batch_size)[1]
    return np.argmax(logits, axis=1).astype(np.int32)


def read_info(eval_dir: str | pathlib.Path) -> dict[str, Any]:
  """Read EVAL_DIR/evaluator.json; raise FileNotFoundError when the evaluator is not trained."""
  eval_dir = pathlib.Path(eval_dir)
  path = eval_dir / INFO_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f'no trained evaluator in {eval_dir}: {path} not found. Train one with `python -m '
      f'opengan_jax.evaluation.train_evaluator --config=configs/flowers.py --workdir={eval_dir}`, '
      'or check --evaluator_dir.'
    )
  return json.loads(path.read_text())


def restore_evaluator(
  eval_dir: str | pathlib.Path, expected_resolution: int | None = None
) -> Evaluator:
  """Restore the evaluator trained in `eval_dir`.

  Raises FileNotFoundError when `eval_dir` has no finished evaluator (evaluator.json and a
  checkpoint), and ValueError when `expected_resolution` is given and differs from the
  evaluator's resolution.
  """
  eval_dir = pathlib.Path(eval_dir)
  info = read_info(eval_dir)
  if expected_resolution is not None and int(info['resolution']) != int(expected_resolution):
    raise ValueError(
      f'the evaluator in {eval_dir} was trained at {info["resolution"]} px, but the GAN '
      f'generates {expected_resolution} px images. Train an evaluator at the GAN resolution '
      f'(--config.resolution={expected_resolution}) and pass its directory.'
    )
  restored, step = checkpointing.restore_latest_as_saved(eval_dir, STAGE)
  if step is None:
    raise FileNotFoundError(
      f'no evaluator checkpoint in {eval_dir / "checkpoints" / STAGE}: its training did not '
      'finish. Rerun train_evaluator with the same --workdir to resume it.'
    )
  network = EvaluatorNet(num_classes=len(info['class_names']), widths=tuple(info['widths']))
  mesh = local_mesh()
  variables = {'params': restored['params'], 'batch_stats': restored['batch_stats']}
  return Evaluator(
    network=network,
    variables=parallel.replicate(variables, mesh),
    info=info,
    directory=eval_dir,
    mesh=mesh,
    apply_fn=make_apply_fn(network),
  )

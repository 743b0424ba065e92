"""Stage 1: training the metric feature extractor F with the NCA loss.

F maps an image to a d-dimensional feature. Every training image also owns a Gaussian kernel centre
in that space: its feature, cached and refreshed only every few epochs. The loss (Eq. 1 of Ditria,
Meyer and Drummond, "OpenGAN: Open Set Generative Adversarial Networks", 2020) is, for an image i
with feature f_i and label l_i,

  -ln( sum_{j != i, l_j = l_i} exp(-||f_i - c_j||^2 / (2 sigma^2))
       / sum_{k != i} exp(-||f_i - c_k||^2 / (2 sigma^2)) ),

where the c_j are the cached centres. The centres are constants: gradients reach F only through
the features of the current batch.

This module contains the pure pieces: the loss, the train state, the data-parallel train step, batched
feature extraction and the recall@1 metric. The epoch loop, centre refresh and checkpointing live in
the training driver.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


# --------------------------------------------------------------------------------------------------
# NCA loss.


def squared_distances(features: jax.Array, centres: jax.Array) -> jax.Array:
  """Return the (B, N) squared Euclidean distances between rows of `features` and `centres`.

  Uses ||a||^2 + ||b||^2 - 2 a.b, clipped at 0 because rounding can make it slightly negative.
  """
  feature_norms = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  centre_norms = jnp.sum(jnp.square(centres), axis=-1)
  cross = features @ centres.T
  return jnp.maximum(feature_norms + centre_norms[None, :] - 2.0 * cross, 0.0)


def _neighbour_masks(
  indices: jax.Array, labels: jax.Array, centre_labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Return (B, N) masks: centres other than the image's own, and those among them of its class."""
  not_self = jnp.arange(centre_labels.shape[0])[None, :] != indices[:, None]
  same_class = (centre_labels[None, :] == labels[:, None]) & not_self
  return not_self, same_class


def nca_loss_per_example(
  features: jax.Array,
  indices: jax.Array,
  labels: jax.Array,
  centres: jax.Array,
  centre_labels: jax.Array,
  sigma: float,
  top_k: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Compute the NCA loss of each image of a batch against the cached centres.

  Args:
    features: (B, d) features of the batch, differentiable.
    indices: (B,) rows of the batch images in the training set, which are also their rows in
      `centres`. Each image's own centre is left out of both sums.
    labels: (B,) class labels of the batch.
    centres: (N, d) cached kernel centres, one per training image. No gradient flows into them.
    centre_labels: (N,) class labels of the centres.
    sigma: width of the Gaussian kernels, in feature units.
    top_k: if set, the denominator keeps only the `top_k` centres nearest to each feature (besides
      its own), plus all centres of its class; None keeps every centre.

  Returns:
    (losses, valid): losses (B,) and a boolean mask (B,). An image whose class has no other centre
    in the cache has an undefined loss (an empty numerator). Its `valid` is False and its loss is
    0 with zero gradient, so callers exclude it from the mean.
  """
  if features.ndim != 2 or centres.ndim != 2 or features.shape[1] != centres.shape[1]:
    raise ValueError(
      f'features {features.shape} and centres {centres.shape} must be (B, d) and (N, d) with the '
      'same d'
    )
  if top_k is not None and top_k < 1:
    raise ValueError(f'top_k must be None or a positive integer, got {top_k}')

  centres = lax.stop_gradient(centres)
  num_centres = centres.shape[0]
  logits = -squared_distances(features, centres) / (2.0 * sigma**2)

  not_self, same_class = _neighbour_masks(indices, labels, centre_labels)
  valid = jnp.any(same_class, axis=1)

  denominator_mask = not_self
  if top_k is not None and top_k < num_centres - 1:
    # Departs from Eq. 1, which sums over all centres, to save time on large caches.
    # The denominator is the k nearest centres plus all same-class centres, so it always contains
    # the numerator and the ratio stays at most 1 when no same-class centre is among the k nearest.
    _, nearest = lax.top_k(jnp.where(not_self, logits, -jnp.inf), top_k)
    rows = jnp.arange(features.shape[0])[:, None]
    is_nearest = jnp.zeros_like(not_self).at[rows, nearest].set(True)
    denominator_mask = (is_nearest | same_class) & not_self

  # Rows without a positive get all-True masks in both sums, so the numerator equals the
  # denominator and the loss is exactly 0 with finite gradients. An all-masked logsumexp would give
  # -inf and NaN gradients, which leak through a later `where`.
  numerator_mask = jnp.where(valid[:, None], same_class, True)
  denominator_mask = jnp.where(valid[:, None], denominator_mask, True)
  log_numerator = jax.nn.logsumexp(logits, axis=1, where=numerator_mask)
  log_denominator = jax.nn.logsumexp(logits, axis=1, where=denominator_mask)
  losses = jnp.where(valid, log_denominator - log_numerator, 0.0)
  return losses, valid


def nca_loss(
  features: jax.Array,
  indices: jax.Array,
  labels: jax.Array,
  centres: jax.Array,
  centre_labels: jax.Array,
  sigma: float,
  top_k: int | None = None,
) -> jax.Array:
  """Return the NCA loss (Eq. 1) averaged over the batch images that have a same-class centre.

  Arguments are those of `nca_loss_per_example`. Images whose class has no other centre in the
  cache are excluded from the mean; the result is 0 when every image is excluded.
  """
  losses, valid = nca_loss_per_example(
    features, indices, labels, centres, centre_labels, sigma, top_k
  )
  return jnp.sum(losses) / jnp.maximum(jnp.sum(valid), 1)


# --------------------------------------------------------------------------------------------------
# Train state and step.


class ExtractorState(flax.struct.PyTreeNode):
  """Training state of the feature extractor: step, variables and Adam state."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads: Any, batch_stats: Any) -> ExtractorState:
    """Return the state after one optimizer update with `grads` and new BatchNorm statistics."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
    )

  @property
  def variables(self) -> dict[str, Any]:
    """Variables for `model.apply`."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


def create_extractor_state(
  model: nn.Module,
  rng: jax.Array,
  image_shape: tuple[int, int, int],
  config_extractor: ml_collections.ConfigDict,
) -> ExtractorState:
  """Initialise the extractor's variables and its Adam optimizer.

  Args:
    model: the feature extractor, called as `model(x, train)` on (B, H, W, 3) images in [-1, 1].
    rng: key for the initial weights.
    image_shape: (H, W, 3) of one input image, or a batch shape (B, H, W, 3) whose B is ignored.
    config_extractor: `config.extractor`; uses learning_rate, b1 and b2.
  """
  if len(image_shape) not in (3, 4):
    raise ValueError(f'image_shape must be (H, W, 3) or (B, H, W, 3), got {image_shape}')
  init_model = model.clone(axis_name=None)
  dummy = jnp.zeros((1, *image_shape[-3:]), jnp.float32)
  variables = jax.jit(functools.partial(init_model.init, train=False))(rng, dummy)
  tx = optax.adam(
    learning_rate=config_extractor.learning_rate, b1=config_extractor.b1, b2=config_extractor.b2
  )
  params = variables['params']
  return ExtractorState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
    tx=tx,
  )


def extractor_train_step(
  state: ExtractorState,
  batch: Batch,
  centres: jax.Array,
  centre_labels: jax.Array,
  *,
  model: nn.Module,
  sigma: float,
  top_k: int | None,
  axis_name: str,
) -> tuple[ExtractorState, Metrics]:
  """Run one extractor update on this device's share of the global batch.

  Runs inside `jax.shard_map` over `axis_name`, with `model.axis_name == axis_name` so that
  BatchNorm averages its batch statistics over all devices.

  Args:
    state: replicated extractor state.
    batch: this device's images (B, H, W, 3) float32 in [-1, 1], `label` (B,) and `index` (B,),
      the images' rows in the training set.
    centres: (N, d) replicated cached centres of all training images.
    centre_labels: (N,) replicated labels of the centres.
    model: the feature extractor.
    sigma: NCA kernel width.
    top_k: NCA denominator size, or None for all centres.
    axis_name: the data-parallel axis.

  Returns:
    The new state and scalar metrics: `loss` (NCA loss averaged over the global batch),
    `num_excluded` (global-batch images with no same-class centre, left out of the loss) and
    `feature_norm` (mean L2 norm of the features, to compare with sigma).
  """
  # Each device contributes sum(local losses) / (global valid count), and the shares are summed
  # over devices. Unlike averaging per-device means with pmean, this stays the exact global mean
  # when devices hold different numbers of excluded images.
  _, same_class = _neighbour_masks(batch['index'], batch['label'], centre_labels)
  local_valid = jnp.any(same_class, axis=1)
  global_valid = lax.psum(jnp.sum(local_valid), axis_name)
  global_excluded = lax.psum(jnp.sum(~local_valid), axis_name)

  def loss_fn(params):
    features, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
    )
    losses, _ = nca_loss_per_example(
      features, batch['index'], batch['label'], centres, centre_labels, sigma, top_k
    )
    loss_share = jnp.sum(losses) / jnp.maximum(global_valid, 1)
    return loss_share, (features, updates['batch_stats'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss_share, (features, batch_stats)), grads = grad_fn(state.params)
  grads = lax.psum(grads, axis_name)
  # BatchNorm already averaged its statistics over `axis_name`, so `batch_stats` is replicated.
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)

  metrics = {
    'loss': lax.psum(loss_share, axis_name),
    'num_excluded': global_excluded,
    'feature_norm': lax.pmean(jnp.mean(jnp.linalg.norm(features, axis=-1)), axis_name),
  }
  return new_state, metrics


def _mesh_axis(mesh: Mesh) -> str:
  if len(mesh.axis_names) != 1:
    raise ValueError(f'expected a mesh with one data-parallel axis, got axes {mesh.axis_names}')
  return mesh.axis_names[0]


def make_extractor_train_step(
  model: nn.Module, mesh: Mesh, sigma: float, top_k: int | None
) -> Callable[[ExtractorState, Batch, jax.Array, jax.Array], tuple[ExtractorState, Metrics]]:
  """Return a jitted data-parallel `(state, batch, centres, centre_labels) -> (state, metrics)`.

  The batch is the global batch, split along its first dimension over the mesh's only axis; state,
  centres and metrics are replicated. The global batch size must be divisible by the mesh size.
  Pass the state already replicated over the mesh, as the step returns it, or the second call
  compiles again for the new input sharding.
  """
  axis = _mesh_axis(mesh)
  step = functools.partial(
    extractor_train_step,
    model=model.clone(axis_name=axis),
    sigma=sigma,
    top_k=top_k,
    axis_name=axis,
  )
  # check_vma=False keeps the classic collective semantics: gradients of replicated parameters
  # come out per device and are summed explicitly by the psum in the step.
  sharded = jax.shard_map(
    step,
    mesh=mesh,
    in_specs=(P(), P(axis), P(), P()),
    out_specs=(P(), P()),
    check_vma=False,
  )
  return jax.jit(sharded)


# --------------------------------------------------------------------------------------------------
# Feature extraction and recall@1.


@functools.partial(jax.jit, static_argnames='model')
def _eval_features(model: nn.Module, variables: Any, images_uint8: jax.Array) -> jax.Array:
  images = images_uint8.astype(jnp.float32) / 127.5 - 1.0
  return model.apply(variables, images, train=False)


def compute_features(
  model: nn.Module,
  variables: Any,
  images_uint8: np.ndarray,
  batch_size: int,
  mesh: Mesh | None = None,
) -> np.ndarray:
  """Extract features of uint8 images in eval mode (BatchNorm running averages).

  Args:
    model: the feature extractor.
    variables: its 'params' and 'batch_stats' collections.
    images_uint8: (N, H, W, 3) uint8 images, converted to [-1, 1] on the device.
    batch_size: images per forward pass. The last batch is zero-padded to this size, so one
      compilation serves every batch.
    mesh: if given, every batch is split over the mesh's only axis (the batch size is rounded up
      to a multiple of the mesh size). The mesh must contain only this process's devices, because
      the features are copied back to the host.

  Returns:
    (N, d) float32 features.
  """
  num_images = images_uint8.shape[0]
  variables = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
  image_sharding = None
  if mesh is not None:
    axis = _mesh_axis(mesh)
    batch_size = -(-batch_size // mesh.size) * mesh.size
    image_sharding = NamedSharding(mesh, P(axis))
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
  model = model.clone(axis_name=None)

  outputs = []
  for start in range(0, num_images, batch_size):
    chunk = np.asarray(images_uint8[start : start + batch_size])
    num_real = chunk.shape[0]
    if num_real < batch_size:
      padding = np.zeros((batch_size - num_real, *chunk.shape[1:]), chunk.dtype)
      chunk = np.concatenate([chunk, padding])
    if image_sharding is not None:
      chunk = jax.device_put(chunk, image_sharding)
    features = _eval_features(model, variables, chunk)
    outputs.append(np.asarray(features[:num_real], dtype=np.float32))
  if not outputs:
    raise ValueError('compute_features needs at least one image, got an empty array')
  return np.concatenate(outputs)


def recall_at_1(features: np.ndarray, labels: np.ndarray, chunk_size: int = 1024) -> float:
  """Return leave-one-out nearest-neighbour accuracy under squared Euclidean distance.

  Each image's nearest other image must share its label to count as a hit. Distances are computed
  for `chunk_size` query rows at a time, so memory grows as chunk_size * N, not N^2. Ties go to
  the lowest index.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  num_images = features.shape[0]
  if num_images < 2:
    raise ValueError(f'recall@1 needs at least 2 images, got {num_images}')

  norms = np.sum(np.square(features), axis=1)
  hits = 0
  for start in range(0, num_images, chunk_size):
    queries = features[start : start + chunk_size]
    rows = np.arange(queries.shape[0])
    distances = (
      norms[start : start + chunk_size, None] + norms[None, :] - 2.0 * queries @ features.T
    )
    distances[rows, start + rows] = np.inf
    nearest = np.argmin(distances, axis=1)
    hits += int(np.sum(labels[nearest] == labels[start : start + chunk_size]))
  return hits / num_images

"""Tests of the NCA loss, the extractor train step, feature extraction and recall@1."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opengan_jax import metric_learning


class TinyExtractor(nn.Module):
  """Small conv net with BatchNorm and the ResNet18 call signature, so tests stay fast.

  Its convolutions have no bias, as in ResNet18, because a bias before BatchNorm has a gradient of pure
  rounding noise, which Adam scales up to a full step, so it would differ between device counts.
  """

  feature_dim: int = 8
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for channels in (8, 16):
      x = nn.Conv(channels, (3, 3), strides=(2, 2), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.feature_dim)(x)


def _extractor_config(learning_rate: float = 1e-3) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'learning_rate': learning_rate, 'b1': 0.9, 'b2': 0.999})


def _mesh(num_devices: int) -> Mesh:
  return Mesh(np.array(jax.devices()[:num_devices]), ('data',))


# --------------------------------------------------------------------------------------------------
# NCA loss against a direct transcription of Eq. 1 of the OpenGAN paper (Ditria et al., 2020).


def _naive_nca(features, indices, labels, centres, centre_labels, sigma, top_k=None):
  """Return the mean NCA loss computed term by term with explicit loops.

  With top_k, the denominator is the k nearest non-self centres united with all same-class centres.
  """
  losses = []
  for i in range(features.shape[0]):
    kernels = {}
    for j in range(centres.shape[0]):
      if j == indices[i]:
        continue
      distance = np.sum((features[i] - centres[j]) ** 2)
      kernels[j] = (distance, np.exp(-distance / (2 * sigma**2)))
    positives = [j for j in kernels if centre_labels[j] == labels[i]]
    if not positives:
      continue
    if top_k is None:
      denominator_set = set(kernels)
    else:
      by_distance = sorted(kernels, key=lambda j: kernels[j][0])
      denominator_set = set(by_distance[:top_k]) | set(positives)
    numerator = sum(kernels[j][1] for j in positives)
    denominator = sum(kernels[j][1] for j in denominator_set)
    losses.append(-np.log(numerator / denominator))
  return np.mean(losses) if losses else 0.0


def _random_problem(seed, batch=6, num_centres=20, dim=5, num_classes=3):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_centres, dim))
  centre_labels = rng.integers(0, num_classes, size=num_centres)
  indices = rng.choice(num_centres, size=batch, replace=False)
  features = centres[indices] + 0.5 * rng.normal(size=(batch, dim))
  labels = centre_labels[indices]
  return features, indices, labels, centres, centre_labels


@pytest.mark.parametrize('sigma', [0.3, 1.0, 3.0])
@pytest.mark.parametrize('top_k', [None, 1, 4, 10])
def test_nca_loss_matches_naive(sigma, top_k):
  problem = _random_problem(seed=int(sigma * 10) + (top_k or 0))
  expected = _naive_nca(*problem, sigma, top_k)
  with jax.enable_x64(True):
    actual = metric_learning.nca_loss(*(jnp.asarray(a) for a in problem), sigma, top_k)
    assert actual.dtype == jnp.float64
  np.testing.assert_allclose(float(actual), expected, rtol=1e-5)


def test_nca_loss_float32_matches_naive():
  problem = _random_problem(seed=7)
  expected = _naive_nca(*problem, 1.0)
  inputs = [np.asarray(a, np.float32) if a.dtype == np.float64 else a for a in problem]
  actual = metric_learning.nca_loss(*inputs, 1.0)
  np.testing.assert_allclose(float(actual), expected, rtol=1e-4)


def test_nca_top_k_covering_all_equals_full():
  problem = _random_problem(seed=3)
  full = metric_learning.nca_loss(*problem, 1.0)
  covering = metric_learning.nca_loss(*problem, 1.0, top_k=19)
  np.testing.assert_allclose(float(covering), float(full), rtol=1e-6)


def test_nca_excludes_singleton_class():
  features, indices, labels, centres, centre_labels = _random_problem(seed=11)
  # Give the first image's centre a class of its own, so it has no positive.
  centre_labels = centre_labels.copy()
  centre_labels[indices[0]] = 99
  labels = labels.copy()
  labels[0] = 99
  args = (features, indices, labels, centres, centre_labels, 1.0)

  losses, valid = metric_learning.nca_loss_per_example(*args)
  assert not bool(valid[0])
  assert bool(np.all(valid[1:]))
  assert float(losses[0]) == 0.0
  mean = metric_learning.nca_loss(*args)
  np.testing.assert_allclose(float(mean), float(np.mean(losses[1:])), rtol=1e-6)
  np.testing.assert_allclose(float(mean), _naive_nca(*args), rtol=1e-4)

  grads = jax.grad(lambda f: metric_learning.nca_loss(f, *args[1:]))(jnp.asarray(features))
  assert bool(jnp.all(jnp.isfinite(grads)))
  assert bool(jnp.all(grads[0] == 0.0))


def test_nca_all_excluded_gives_zero():
  features, indices, _, centres, _ = _random_problem(seed=5)
  centre_labels = np.arange(centres.shape[0])
  labels = centre_labels[indices]
  loss = metric_learning.nca_loss(features, indices, labels, centres, centre_labels, 1.0)
  assert float(loss) == 0.0


@pytest.mark.parametrize('top_k', [None, 4])
def test_nca_gradients(top_k):
  features, indices, labels, centres, centre_labels = (
    jnp.asarray(a, jnp.float32) if a.dtype == np.float64 else a for a in _random_problem(seed=2)
  )

  def loss(f, c):
    return metric_learning.nca_loss(f, indices, labels, c, centre_labels, 1.0, top_k)

  feature_grads, centre_grads = jax.grad(loss, argnums=(0, 1))(features, centres)
  assert bool(jnp.all(jnp.isfinite(feature_grads)))
  assert float(jnp.max(jnp.abs(feature_grads))) > 0.0
  assert bool(jnp.all(centre_grads == 0.0))


def test_nca_rejects_mismatched_dims():
  with pytest.raises(ValueError, match='same d'):
    metric_learning.nca_loss(
      jnp.zeros((2, 3)), jnp.arange(2), jnp.zeros(2, int), jnp.zeros((4, 5)), jnp.zeros(4, int), 1.0
    )


# --------------------------------------------------------------------------------------------------
# recall@1.


def _brute_force_recall(features, labels):
  features = np.asarray(features, np.float64)
  hits = 0
  for i in range(features.shape[0]):
    distances = np.sum((features - features[i]) ** 2, axis=1)
    distances[i] = np.inf
    hits += labels[np.argmin(distances)] == labels[i]
  return hits / features.shape[0]


@pytest.mark.parametrize('chunk_size', [1, 7, 1000])
def test_recall_matches_brute_force(chunk_size):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=50)
  features = rng.normal(size=(50, 6)) + 0.8 * labels[:, None]
  expected = _brute_force_recall(features, labels)
  assert 0.0 < expected < 1.0
  assert metric_learning.recall_at_1(features, labels, chunk_size) == pytest.approx(expected)


def test_recall_known_answer():
  # Pairs of points lie far apart, so each point's nearest neighbour is its partner. Pairs 0 and 1 share
  # a label, pair 2 is split across two labels, so 4 of 6 images are hits.
  features = np.array([[0.0], [0.1], [10.0], [10.1], [20.0], [20.1]])
  labels = np.array([0, 0, 1, 1, 2, 3])
  assert metric_learning.recall_at_1(features, labels, chunk_size=4) == pytest.approx(4 / 6)


# --------------------------------------------------------------------------------------------------
# State, step and features with the stand-in network.


def _image_batch(seed, batch, num_classes=3, size=8, noise=0.2):
  """Images of constant class colour plus noise, in [-1, 1], with their labels."""
  rng = np.random.default_rng(seed)
  colours = np.array([[0.8, -0.5, -0.5], [-0.5, 0.8, -0.5], [-0.5, -0.5, 0.8]])[:num_classes]
  labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
  images = colours[labels][:, None, None, :] + noise * rng.normal(size=(batch, size, size, 3))
  return np.clip(images, -1.0, 1.0).astype(np.float32), labels


def _to_uint8(images):
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


def test_create_extractor_state():
  model = TinyExtractor()
  state = metric_learning.create_extractor_state(
    model, jax.random.key(0), (8, 8, 3), _extractor_config()
  )
  assert int(state.step) == 0
  assert 'batch_stats' in state.variables
  features = model.apply(state.variables, jnp.zeros((2, 8, 8, 3)), train=False)
  assert features.shape == (2, 8)


def test_multi_device_step_matches_single_device():
  model = TinyExtractor()
  state = metric_learning.create_extractor_state(
    model, jax.random.key(0), (8, 8, 3), _extractor_config()
  )
  # Plain SGD with rate 1 makes the parameter change equal to minus the gradient. Adam's first step
  # is about lr * sign(g), which turns rounding noise in near-zero gradients into full steps.
  sgd = optax.sgd(1.0)
  state = state.replace(tx=sgd, opt_state=sgd.init(state.params))
  images, labels = _image_batch(seed=1, batch=32)
  centres = metric_learning.compute_features(model, state.variables, _to_uint8(images), 32)
  # The global batch is images 0..7; the first is given a class of its own (no positive), so the
  # device holding it has fewer valid images than the others.
  centre_labels = labels.copy()
  centre_labels[0] = 7
  batch = {
    'image': images[:8],
    'label': centre_labels[:8],
    'index': np.arange(8, dtype=np.int32),
  }

  def full_batch_loss(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    features, updates = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
    loss = metric_learning.nca_loss(
      features, batch['index'], batch['label'], centres, centre_labels, 1.0, top_k=5
    )
    return loss, updates['batch_stats']

  (expected_loss, expected_stats), expected_grads = jax.jit(
    jax.value_and_grad(full_batch_loss, has_aux=True)
  )(state.params)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected_grads)) > 0.0

  for num_devices in (1, 4):
    step = metric_learning.make_extractor_train_step(model, _mesh(num_devices), sigma=1.0, top_k=5)
    new_state, metrics = step(state, batch, centres, centre_labels)
    assert int(new_state.step) == 1
    assert int(metrics['num_excluded']) == 1
    np.testing.assert_allclose(metrics['loss'], expected_loss, rtol=1e-5)
    grads = jax.tree.map(
      lambda old, new: np.asarray(old) - np.asarray(new), state.params, new_state.params
    )
    for grad, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
      np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-6)
    stats = zip(
      jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(expected_stats), strict=True
    )
    for stat, expected in stats:
      np.testing.assert_allclose(stat, expected, rtol=1e-4, atol=1e-6)


def test_compute_features_pads_and_shards():
  model = TinyExtractor()
  state = metric_learning.create_extractor_state(
    model, jax.random.key(1), (8, 8, 3), _extractor_config()
  )
  images, _ = _image_batch(seed=2, batch=11)
  images_uint8 = _to_uint8(images)
  expected = model.apply(state.variables, images_uint8 / 127.5 - 1.0, train=False)

  single = metric_learning.compute_features(model, state.variables, images_uint8, batch_size=4)
  sharded = metric_learning.compute_features(
    model, state.variables, images_uint8, batch_size=6, mesh=_mesh(4)
  )
  assert single.shape == (11, 8)
  assert single.dtype == np.float32
  np.testing.assert_allclose(single, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sharded, expected, rtol=1e-5, atol=1e-6)


def test_training_lowers_nca_loss():
  model = TinyExtractor()
  state = metric_learning.create_extractor_state(
    model, jax.random.key(2), (8, 8, 3), _extractor_config(learning_rate=3e-3)
  )
  # Noise this strong leaves the untrained network's recall@1 well below 1.
  images, labels = _image_batch(seed=3, batch=48, noise=1.0)
  images_uint8 = _to_uint8(images)
  mesh = _mesh(4)
  step = metric_learning.make_extractor_train_step(model, mesh, sigma=1.0, top_k=None)
  # Replicated from the start, the state keeps one sharding, so the step compiles only once.
  state = jax.device_put(state, NamedSharding(mesh, P()))
  rng = np.random.default_rng(0)

  def evaluate(variables, centres):
    features = metric_learning.compute_features(model, variables, images_uint8, 48)
    indices = np.arange(48)
    return float(metric_learning.nca_loss(features, indices, labels, centres, labels, 1.0))

  centres = metric_learning.compute_features(model, state.variables, images_uint8, 48)
  initial_loss = evaluate(state.variables, centres)
  initial_recall = metric_learning.recall_at_1(centres, labels)
  for step_index in range(30):
    if step_index == 15:
      centres = metric_learning.compute_features(model, state.variables, images_uint8, 48)
    indices = rng.choice(48, size=16, replace=False).astype(np.int32)
    batch = {'image': images[indices], 'label': labels[indices], 'index': indices}
    state, metrics = step(state, batch, centres, labels)
    assert np.isfinite(float(metrics['loss']))

  centres = metric_learning.compute_features(model, state.variables, images_uint8, 48)
  final_loss = evaluate(state.variables, centres)
  assert final_loss < 0.5 * initial_loss, (initial_loss, final_loss)
  assert initial_recall < 0.9
  assert metric_learning.recall_at_1(centres, labels) > initial_recall

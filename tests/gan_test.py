"""Tests of the GAN losses and the data-parallel D/G iteration."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from opengan_jax import gan, parallel
from opengan_jax.models import Discriminator, Generator, ResNet18

RESOLUTION = 32
Z_DIM = 16
BATCH = 8


def test_d_hinge_loss_by_hand():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 0.5])
  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 1.5] -> mean 5/6.
  np.testing.assert_allclose(gan.d_hinge_loss(real, fake), 5 / 6 + 5 / 6, rtol=1e-6)


def test_g_adversarial_loss_by_hand():
  np.testing.assert_allclose(gan.g_adversarial_loss(jnp.array([1.0, -3.0])), 1.0, rtol=1e-6)


def test_feature_loss_sums_dimensions():
  fake = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  real = jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
  # Per example: 0 + 4 + 9 = 13 and 1 + 1 + 1 = 3, so the mean is 8.
  np.testing.assert_allclose(gan.feature_loss(fake, real), 8.0, rtol=1e-6)


def _networks(conditioning: str, num_classes: int | None = None):
  common = dict(
    resolution=RESOLUTION,
    ch=8,
    feature_dim=512,
    conditioning=conditioning,
    norm='batch',
    num_classes=num_classes,
  )
  return Generator(z_dim=Z_DIM, **common), Discriminator(**common)


@functools.lru_cache(maxsize=1)
def _extractor():
  model = ResNet18(stem='cifar')
  variables = model.init(
    jax.random.PRNGKey(7), jnp.zeros((1, RESOLUTION, RESOLUTION, 3)), train=False
  )
  return model, variables


def _batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.uniform(-1, 1, (BATCH, RESOLUTION, RESOLUTION, 3)).astype(np.float32),
    'label': rng.integers(0, 3, (BATCH,)).astype(np.int32),
    'index': np.arange(BATCH, dtype=np.int32),
  }


def _run_steps(num_devices: int, tx: optax.GradientTransformation, conditioning='feature', steps=1):
  generator, discriminator = _networks(conditioning, num_classes=3)
  extractor, extractor_variables = _extractor()
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  state = gan.create_gan_state(
    jax.random.PRNGKey(0),
    generator,
    discriminator,
    tx,
    tx,
    resolution=RESOLUTION,
    z_dim=Z_DIM,
    conditioning=conditioning,
    feature_dim=512,
  )
  state = parallel.replicate(state, mesh)
  step_fn = gan.make_train_step(
    mesh,
    generator=generator,
    discriminator=discriminator,
    extractor=extractor,
    g_tx=tx,
    d_tx=tx,
    conditioning=conditioning,
    z_dim=Z_DIM,
    feature_loss_weight=0.01,
    extractor_image_size=RESOLUTION,
  )
  variables = parallel.replicate(extractor_variables, mesh)
  history = []
  for step in range(steps):
    state, metrics = step_fn(state, parallel.global_batch(_batch(step), mesh), variables)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def test_four_devices_match_one_device():
  if len(jax.devices()) < 4:
    pytest.skip('needs 4 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=4')
  # Plain SGD makes the parameter change equal to the averaged gradient, so the comparison is
  # not blurred by Adam's division by tiny second moments.
  tx = optax.sgd(0.1)
  one, one_metrics = _run_steps(1, tx)
  four, four_metrics = _run_steps(4, tx)

  for key in one_metrics[0]:
    np.testing.assert_allclose(four_metrics[0][key], one_metrics[0][key], rtol=1e-4, atol=1e-5)
  for name in ('generator', 'discriminator'):
    for collection in ('params', 'batch_stats'):
      expected = getattr(getattr(one, name), collection)
      actual = getattr(getattr(four, name), collection)
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), actual, expected
      )
  assert int(four.step) == 1
  for key, value in four_metrics[0].items():
    assert np.isfinite(value), f'{key} is {value}'
  assert four_metrics[0]['feature_loss'] > 0
  assert four_metrics[0]['d_loss'] > 0


@pytest.mark.parametrize('conditioning', ['class', 'none'])
def test_baselines_train_without_feature_loss(conditioning):
  tx = optax.adam(1e-4, b1=0.0, b2=0.999)
  state, history = _run_steps(2, tx, conditioning=conditioning, steps=1)
  assert int(state.step) == 1
  assert history[0]['feature_loss'] == 0.0
  assert np.isfinite(history[0]['g_loss'])


def test_extractor_gets_no_gradient():
  extractor, variables = _extractor()
  images = jnp.zeros((2, RESOLUTION, RESOLUTION, 3))

  def loss(params):
    f = gan.extract_features(extractor, {**variables, 'params': params}, images, RESOLUTION)
    return jnp.sum(f)

  grads = jax.grad(loss)(variables['params'])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_extract_features_resizes_differentiably():
  extractor, variables = _extractor()
  images = jnp.full((2, 16, 16, 3), 0.1)

  def total(x):
    return jnp.sum(gan.extract_features(extractor, variables, x, RESOLUTION))

  grads = jax.grad(total)(images)
  assert grads.shape == images.shape
  assert float(jnp.max(jnp.abs(grads))) > 0

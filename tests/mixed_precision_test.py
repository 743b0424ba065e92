"""Tests of bfloat16 computation in G, D and F (config.model.dtype='bfloat16')."""

import functools

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from opengan_jax import config_checks, gan, networks, parallel
from opengan_jax.models import Discriminator, Generator, ResNet18

RESOLUTION = 32
CH = 8
Z_DIM = 16
BATCH = 4
NUM_DEVICES = 2
NUM_STEPS = 3
LEARNING_RATE = 1e-4


def _networks(dtype) -> tuple[Generator, Discriminator, ResNet18]:
  common = dict(resolution=RESOLUTION, ch=CH, feature_dim=512, dtype=dtype)
  return Generator(z_dim=Z_DIM, **common), Discriminator(**common), ResNet18('cifar', dtype=dtype)


@functools.lru_cache(maxsize=1)
def _initial_values():
  """Return host copies of a float32-initialised GAN state and random F variables."""
  generator, discriminator, extractor = _networks(jnp.float32)
  tx = gan.make_optimizer(LEARNING_RATE, 0.0, 0.999)
  create = functools.partial(
    gan.create_gan_state,
    generator=generator,
    discriminator=discriminator,
    g_tx=tx,
    d_tx=tx,
    resolution=RESOLUTION,
    z_dim=Z_DIM,
    conditioning='feature',
    feature_dim=512,
  )
  state = jax.jit(create)(jax.random.PRNGKey(0))
  extractor_variables = jax.jit(extractor.init, static_argnames='train')(
    jax.random.PRNGKey(1), jnp.zeros((1, RESOLUTION, RESOLUTION, 3)), train=False
  )
  return jax.device_get(state), jax.device_get(extractor_variables)


def _batches():
  rng = np.random.default_rng(0)
  for _ in range(NUM_STEPS):
    yield {
      'image': rng.uniform(-1, 1, (BATCH, RESOLUTION, RESOLUTION, 3)).astype(np.float32),
      'label': np.zeros((BATCH,), np.int32),
      'index': np.arange(BATCH, dtype=np.int32),
    }


def _make_step(dtype, mesh):
  generator, discriminator, extractor = _networks(dtype)
  tx = gan.make_optimizer(LEARNING_RATE, 0.0, 0.999)
  return gan.make_train_step(
    mesh,
    generator=generator,
    discriminator=discriminator,
    extractor=extractor,
    g_tx=tx,
    d_tx=tx,
    conditioning='feature',
    z_dim=Z_DIM,
    feature_loss_weight=0.01,
    extractor_image_size=RESOLUTION,
  )


@functools.lru_cache(maxsize=2)
def _train(dtype_name: str):
  """Run NUM_STEPS iterations from the shared initial state; return the state and metrics."""
  mesh = parallel.make_mesh(jax.devices()[:NUM_DEVICES])
  host_state, host_extractor_variables = _initial_values()
  state = parallel.replicate(host_state, mesh)
  extractor_variables = parallel.replicate(host_extractor_variables, mesh)
  train_step = _make_step(jnp.dtype(dtype_name), mesh)
  history = []
  for batch in _batches():
    state, metrics = train_step(state, parallel.global_batch(batch, mesh), extractor_variables)
    history.append({key: float(value) for key, value in jax.device_get(metrics).items()})
  return jax.device_get(state), history


def _sub_jaxprs(eqn):
  for param in eqn.params.values():
    for sub in param if isinstance(param, list | tuple) else (param,):
      if isinstance(sub, jax_core.ClosedJaxpr):
        yield sub.jaxpr
      elif isinstance(sub, jax_core.Jaxpr):
        yield sub


def _dtypes(jaxpr, primitive: str, side: str = 'outvars') -> set:
  """Collect the dtypes of the inputs or outputs of every `primitive` in a jaxpr and below."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      found.update(var.aval.dtype for var in getattr(eqn, side))
    for sub in _sub_jaxprs(eqn):
      found |= _dtypes(sub, primitive, side)
  return found


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_train_step_convs_use_dtype(dtype):
  # Every conv of the iteration, forward and backward, in G, D and both passes of F.
  mesh = parallel.make_mesh(jax.devices()[:NUM_DEVICES])
  host_state, host_extractor_variables = _initial_values()
  batch = parallel.global_batch(next(_batches()), mesh)
  train_step = _make_step(jnp.dtype(dtype), mesh)
  jaxpr = jax.make_jaxpr(train_step)(host_state, batch, host_extractor_variables).jaxpr
  assert _dtypes(jaxpr, 'conv_general_dilated', 'invars') == {jnp.dtype(dtype)}


def test_bfloat16_softmax_and_tanh_stay_float32():
  generator, discriminator, _ = _networks(jnp.bfloat16)
  host_state, _ = _initial_values()
  z = jnp.zeros((BATCH, Z_DIM))
  cond = jnp.zeros((BATCH, 512))
  g_jaxpr = jax.make_jaxpr(
    lambda variables: generator.apply(variables, z, cond, train=True, mutable=list(gan.MUTABLE))
  )(host_state.generator.variables())
  # The softmax of self-attention is the only exp in G.
  assert _dtypes(g_jaxpr.jaxpr, 'exp') == {jnp.dtype(jnp.float32)}
  assert _dtypes(g_jaxpr.jaxpr, 'tanh') == {jnp.dtype(jnp.float32)}
  images = jnp.zeros((BATCH, RESOLUTION, RESOLUTION, 3))
  d_jaxpr = jax.make_jaxpr(
    lambda variables: discriminator.apply(variables, images, cond, train=False)
  )(host_state.discriminator.variables())
  assert _dtypes(d_jaxpr.jaxpr, 'exp') == {jnp.dtype(jnp.float32)}


def test_bfloat16_outputs_are_float32():
  generator, discriminator, extractor = _networks(jnp.bfloat16)
  host_state, extractor_variables = _initial_values()
  z = jnp.ones((BATCH, Z_DIM))
  cond = jnp.ones((BATCH, 512))

  @jax.jit
  def forward(g_variables, d_variables, f_variables):
    images = generator.apply(g_variables, z, cond, train=False)
    logits = discriminator.apply(d_variables, images, cond, train=False)
    return images, logits, extractor.apply(f_variables, images, train=False)

  images, logits, features = forward(
    host_state.generator.variables(), host_state.discriminator.variables(), extractor_variables
  )
  assert images.dtype == jnp.float32
  assert logits.dtype == jnp.float32
  assert features.dtype == jnp.float32


def test_bfloat16_state_stays_float32():
  state, _ = _train('bfloat16')
  # Parameters, Adam moments, BatchNorm statistics and spectral-norm u and sigma.
  leaves = jax.tree_util.tree_leaves((state.generator, state.discriminator))
  float_dtypes = {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)}
  assert float_dtypes == {jnp.dtype(jnp.float32)}


def test_bfloat16_power_iteration_in_float32():
  # The first iteration's power iteration reads the same float32 weights and u vectors in both
  # dtypes. Computed in float32, sigma agrees to float32 rounding; in bfloat16 it would differ
  # by about 2**-8 relative.
  generator_f32, _, _ = _networks(jnp.float32)
  generator_bf16, _, _ = _networks(jnp.bfloat16)
  host_state, _ = _initial_values()
  z = jax.random.normal(jax.random.PRNGKey(3), (BATCH, Z_DIM))
  cond = jax.random.normal(jax.random.PRNGKey(4), (BATCH, 512))
  variables = host_state.generator.variables()
  sigmas = []
  for generator in (generator_f32, generator_bf16):
    _, mutated = generator.apply(variables, z, cond, train=True, mutable=list(gan.MUTABLE))
    del mutated['batch_stats']
    sigmas.append(jax.tree_util.tree_leaves(mutated['spectral']))
  for sigma_f32, sigma_bf16 in zip(*sigmas, strict=True):
    np.testing.assert_allclose(sigma_bf16, sigma_f32, rtol=1e-6, atol=1e-7)


def test_bfloat16_losses_finite_and_near_float32():
  _, history_f32 = _train('float32')
  _, history_bf16 = _train('bfloat16')
  for step, (f32, bf16) in enumerate(zip(history_f32, history_bf16, strict=True)):
    for key in ('d_loss', 'g_adversarial_loss', 'feature_loss'):
      assert np.isfinite(bf16[key]), (step, key, bf16[key])
      # bfloat16 rounds each result to 8 significant bits (up to 2**-8 relative), and the two
      # runs drift apart as their weights do. At this size the metrics differed by up to 2.6%
      # (0.02 absolute) by step 3, half the tolerance.
      np.testing.assert_allclose(bf16[key], f32[key], rtol=0.05, atol=0.05, err_msg=key)
    assert bf16 != f32, 'bfloat16 run gave the float32 metrics bit for bit'


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize('network', ['generator', 'discriminator'])
def test_bfloat16_updates_follow_float32(network):
  initial, _ = _initial_values()
  state_f32, _ = _train('float32')
  state_bf16, _ = _train('bfloat16')

  def update(state):
    before = jax.tree_util.tree_leaves(getattr(initial, network).params)
    after = jax.tree_util.tree_leaves(getattr(state, network).params)
    return np.concatenate([np.ravel(b - a) for a, b in zip(before, after, strict=True)])

  update_f32, update_bf16 = update(state_f32), update(state_bf16)
  assert np.linalg.norm(update_f32) > 0
  # Adam with b1=0 moves each weight by about lr * sign(gradient) per step, so the total
  # updates point the same way when the bfloat16 gradients have the float32 signs. Weights
  # with gradients near 0 may flip sign: the cosine measured 0.91 for G and 0.98 for D, and
  # unrelated updates would give about 0.
  assert _cosine(update_bf16, update_f32) > 0.75


def test_config_dtype_builds_bfloat16_networks():
  config = default.get_config()
  config.model.dtype = 'bfloat16'
  config_checks.validate_config(config, num_devices=1)
  generator, discriminator = networks.make_networks(config, num_classes=1)
  assert generator.dtype == jnp.bfloat16
  assert discriminator.dtype == jnp.bfloat16


def test_config_dtype_invalid_rejected():
  config = default.get_config()
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match='model.dtype'):
    config_checks.validate_config(config, num_devices=1)


def test_config_without_dtype_means_float32():
  config = default.get_config()
  del config.model['dtype']  # As in a workdir config.json written before the field existed.
  assert networks.compute_dtype(config) == jnp.float32

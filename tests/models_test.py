"""Tests for the generator, discriminator, feature extractor and their layers.

Parameter counts are compared with the PyTorch reference of the same networks (torch 2.13
`count_params`: trainable parameters only, so no BatchNorm statistics or spectral-norm
vectors). Large models are only traced with jax.eval_shape; real forward passes use ch=8.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, PartitionSpec

from opengan_jax import models
from opengan_jax.models import layers

BATCH = 4
Z_DIM = 128
FEATURE_DIM = 512


def _num_params(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _inputs(resolution: int, batch: int = BATCH, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 3)
  z = jax.random.normal(keys[0], (batch, Z_DIM))
  f = jax.random.normal(keys[1], (batch, FEATURE_DIM))
  x = jax.random.uniform(keys[2], (batch, resolution, resolution, 3), minval=-1.0, maxval=1.0)
  return z, f, x


def _abstract_variables(module: nn.Module, *args):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, train=False))


def _init(module: nn.Module, *args):
  # Eager init compiles one small program per op and shape, and the threefry RNG makes each
  # of them slow to compile on CPU. The cheaper unsafe_rbg generator is enough for tests.
  return module.init(jax.random.key(0, impl='unsafe_rbg'), *args, train=False)


def _apply(module: nn.Module, variables, *args, train: bool):
  """Apply eagerly, so tests share compiled ops; train mode also returns the updated state."""
  if train:
    return module.apply(variables, *args, train=True, mutable=['batch_stats', 'spectral'])
  return module.apply(variables, *args, train=False)


def _trees_equal(a, b) -> bool:
  leaves = jax.tree_util.tree_leaves(
    jax.tree_util.tree_map(lambda u, v: bool(jnp.all(u == v)), a, b)
  )
  return all(leaves)


# (resolution, generator params, discriminator params) at ch=32, feature conditioning.
REFERENCE_COUNTS = [
  (32, 2_658_852, 897_506),
  (64, 4_445_476, 2_158_818),
  (128, 9_695_524, 4_327_394),
  (256, 15_728_420, 9_309_666),
]


@pytest.mark.parametrize('resolution,g_count,d_count', REFERENCE_COUNTS)
def test_parameter_counts_match_reference(resolution, g_count, d_count):
  z, f, x = _inputs(resolution, batch=2)
  g_vars = _abstract_variables(models.Generator(resolution, ch=32), z, f)
  d_vars = _abstract_variables(models.Discriminator(resolution, ch=32), x, f)
  assert _num_params(g_vars['params']) == g_count
  assert _num_params(d_vars['params']) == d_count


@pytest.mark.parametrize('stem,count', [('cifar', 11_168_832), ('imagenet', 11_176_512)])
def test_resnet18_parameter_count(stem, count):
  variables = _abstract_variables(models.ResNet18(stem), jnp.zeros((2, 64, 64, 3)))
  assert _num_params(variables['params']) == count


def test_block_parameter_counts_256():
  z, f, x = _inputs(256, batch=1)
  g_params = _abstract_variables(models.Generator(256, ch=32), z, f)['params']
  d_params = _abstract_variables(models.Discriminator(256, ch=32), x, f)['params']

  assert _num_params(g_params['linear']) == 1_056_768
  g_blocks = [_num_params(g_params[f'block{i}']) for i in range(6)]
  assert g_blocks == [6_032_896, 4_721_664, 1_771_264, 1_443_328, 492_288, 188_800]
  assert _num_params(g_params['attention']) == 20_481

  assert _num_params(d_params['conv_in']) == 896
  d_blocks = [_num_params(d_params[f'block{i}']) for i in range(6)]
  assert d_blocks == [29_856, 119_104, 475_776, 1_245_952, 1_901_824, 4_982_272]
  assert _num_params(d_params['attention']) == 20_481
  assert _num_params(d_params['norm']) == 525_312
  assert _num_params(d_params['conv_out']) == 8_193


@pytest.mark.parametrize(
  'resolution,g_channels,d_channels,attention_side',
  [
    (32, (256, 128, 64, 32), (32, 64, 128, 256), 16),
    (64, (256, 256, 128, 64, 32), (32, 64, 128, 256, 256), 16),
    (128, (512, 256, 256, 128, 64, 32), (32, 64, 128, 256, 256, 512), 32),
    (256, (512, 512, 256, 256, 128, 64, 32), (32, 64, 128, 256, 256, 512, 512), 64),
  ],
)
def test_channel_schedule(resolution, g_channels, d_channels, attention_side):
  assert models.generator_channels(resolution, 32) == g_channels
  assert models.discriminator_channels(resolution, 32) == d_channels
  assert models.attention_resolution(resolution) == attention_side
  assert models.num_blocks(resolution) == len(g_channels) - 1


@pytest.mark.parametrize('resolution', [32, 64, 128, 256])
def test_attention_channels(resolution):
  # Self-attention has 1.25 C^2 + 1 parameters, so its size gives its channel count.
  channels = {32: 64, 64: 128, 128: 128, 256: 128}[resolution]
  z, f, x = _inputs(resolution, batch=1)
  g_params = _abstract_variables(models.Generator(resolution, ch=32), z, f)['params']
  d_params = _abstract_variables(models.Discriminator(resolution, ch=32), x, f)['params']
  assert _num_params(g_params['attention']) == 5 * channels**2 // 4 + 1
  assert _num_params(d_params['attention']) == 5 * channels**2 // 4 + 1


@pytest.mark.parametrize('resolution', [32, 64, 128, 256])
def test_output_shapes(resolution):
  z, f, x = _inputs(resolution, batch=2)
  generator = models.Generator(resolution, ch=8)
  discriminator = models.Discriminator(resolution, ch=8)
  g_vars = _abstract_variables(generator, z, f)
  d_vars = _abstract_variables(discriminator, x, f)

  images = jax.eval_shape(functools.partial(generator.apply, train=False), g_vars, z, f)
  logits = jax.eval_shape(functools.partial(discriminator.apply, train=False), d_vars, x, f)
  assert images.shape == (2, resolution, resolution, 3)
  assert images.dtype == jnp.float32
  assert logits.shape == (2,)
  assert logits.dtype == jnp.float32


@pytest.fixture(scope='module')
def small_models():
  """Initialised G and D at R=32, ch=8, with their variables."""
  z, f, x = _inputs(32)
  generator = models.Generator(32, ch=8)
  discriminator = models.Discriminator(32, ch=8)
  g_vars = _init(generator, z, f)
  d_vars = _init(discriminator, x, f)
  return generator, g_vars, discriminator, d_vars


def test_forward_values(small_models):
  generator, g_vars, discriminator, d_vars = small_models
  z, f, x = _inputs(32, seed=3)
  images, _ = _apply(generator, g_vars, z, f, train=True)
  logits = _apply(discriminator, d_vars, x, f, train=False)

  assert images.shape == (BATCH, 32, 32, 3)
  assert bool(jnp.all(jnp.abs(images) <= 1.0))
  assert float(jnp.std(images)) > 0.0
  assert logits.shape == (BATCH,)
  assert bool(jnp.all(jnp.isfinite(logits)))
  # The logits depend on the image and on the condition.
  assert float(jnp.std(logits)) > 0.0
  other_logits = _apply(discriminator, d_vars, x, f[::-1], train=False)
  assert not bool(jnp.allclose(logits, other_logits))


def test_variable_collections(small_models):
  _, g_vars, _, d_vars = small_models
  assert set(g_vars) == {'params', 'batch_stats', 'spectral'}
  assert set(d_vars) == {'params', 'batch_stats', 'spectral'}
  # Every kernel has spectral-norm state, except the conditional-norm linears.
  for variables in (g_vars, d_vars):
    flat_params = traverse_util.flatten_dict(variables['params'])
    flat_spectral = traverse_util.flatten_dict(variables['spectral'])
    kernels = [path for path in flat_params if path[-1] == 'kernel']
    conditional = [path for path in kernels if path[-2] in ('scale', 'bias')]
    normalized = [path for path in kernels if path[-2] not in ('scale', 'bias')]
    assert conditional
    assert normalized
    for path in normalized:
      assert (*path[:-2], 'sn', f'{path[-2]}/kernel/u') in flat_spectral, path
    for path in conditional:
      assert not any(key[: len(path) - 2] == path[:-2] for key in flat_spectral), path


def test_attention_gamma_starts_at_zero(small_models):
  _, g_vars, _, d_vars = small_models
  assert float(g_vars['params']['attention']['gamma']) == 0.0
  assert float(d_vars['params']['attention']['gamma']) == 0.0


def test_eval_mode_keeps_state(small_models):
  generator, g_vars, discriminator, d_vars = small_models
  z, f, x = _inputs(32, seed=4)
  mutable = ['batch_stats', 'spectral']
  _, g_state = generator.apply(g_vars, z, f, train=False, mutable=mutable)
  _, d_state = discriminator.apply(d_vars, x, f, train=False, mutable=mutable)
  assert _trees_equal(g_state['batch_stats'], g_vars['batch_stats'])
  assert _trees_equal(g_state['spectral'], g_vars['spectral'])
  assert _trees_equal(d_state['batch_stats'], d_vars['batch_stats'])
  assert _trees_equal(d_state['spectral'], d_vars['spectral'])


def test_train_mode_updates_state(small_models):
  generator, g_vars, discriminator, d_vars = small_models
  z, f, x = _inputs(32, seed=5)
  _, g_state = _apply(generator, g_vars, z, f, train=True)
  _, d_state = _apply(discriminator, d_vars, x, f, train=True)

  old_mean = g_vars['batch_stats']['out_norm']['batch_norm']['mean']
  new_mean = g_state['batch_stats']['out_norm']['batch_norm']['mean']
  assert not bool(jnp.allclose(old_mean, new_mean))
  old_sigma = g_vars['spectral']['linear']['sn']['dense/kernel/sigma']
  new_sigma = g_state['spectral']['linear']['sn']['dense/kernel/sigma']
  assert float(old_sigma) == 1.0
  assert float(new_sigma) != 1.0
  assert not _trees_equal(d_state['batch_stats'], d_vars['batch_stats'])
  assert not _trees_equal(d_state['spectral'], d_vars['spectral'])


def test_class_conditioning_runs():
  z, _, x = _inputs(32)
  labels = jnp.array([0, 1, 2, 1], dtype=jnp.int32)
  generator = models.Generator(32, ch=8, conditioning='class', num_classes=3)
  discriminator = models.Discriminator(32, ch=8, conditioning='class', num_classes=3)
  g_vars = _init(generator, z, labels)
  d_vars = _init(discriminator, x, labels)

  assert g_vars['params']['class_embedding']['embedding'].shape == (3, FEATURE_DIM)
  assert d_vars['params']['class_embedding']['embedding'].shape == (3, FEATURE_DIM)
  images, _ = _apply(generator, g_vars, z, labels, train=True)
  logits = _apply(discriminator, d_vars, x, labels, train=False)
  assert images.shape == (BATCH, 32, 32, 3)
  assert logits.shape == (BATCH,)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_unconditional_runs():
  z, _, x = _inputs(32)
  generator = models.Generator(32, ch=8, conditioning='none')
  discriminator = models.Discriminator(32, ch=8, conditioning='none')
  g_vars = _init(generator, z, None)
  d_vars = _init(discriminator, x, None)

  # Plain norms: a learned per-channel scale and bias, no linears on a condition.
  block_norm = g_vars['params']['block0']['norm1']['batch_norm']
  assert set(block_norm) == {'scale', 'bias'}
  assert set(d_vars['params']['norm']['batch_norm']) == {'scale', 'bias'}
  images, _ = _apply(generator, g_vars, z, None, train=True)
  logits = _apply(discriminator, d_vars, x, None, train=False)
  assert images.shape == (BATCH, 32, 32, 3)
  assert logits.shape == (BATCH,)


def test_instance_norm_has_no_batch_stats():
  z, f, x = _inputs(32, batch=2)
  g_vars = _abstract_variables(models.Generator(32, ch=8, norm='instance'), z, f)
  d_vars = _abstract_variables(models.Discriminator(32, ch=8, norm='instance'), x, f)
  assert 'batch_stats' not in g_vars
  assert 'batch_stats' not in d_vars
  assert set(g_vars['params']['out_norm']['instance_norm']) == {'scale', 'bias'}


@pytest.mark.parametrize('resolution', [16, 48, 512])
def test_invalid_resolution_raises(resolution):
  with pytest.raises(ValueError, match=rf'{resolution}.*32, 64, 128, 256'):
    models.check_resolution(resolution)
  with pytest.raises(ValueError, match=str(resolution)):
    models.Generator(resolution)
  with pytest.raises(ValueError, match=str(resolution)):
    models.Discriminator(resolution)


def test_invalid_fields_raise():
  with pytest.raises(ValueError, match=r"'label'.*'feature', 'class', 'none'"):
    models.Generator(32, conditioning='label')
  with pytest.raises(ValueError, match=r"'layer'.*'batch', 'instance'"):
    models.Discriminator(32, norm='layer')
  with pytest.raises(ValueError, match='num_classes'):
    models.Generator(32, conditioning='class')
  with pytest.raises(ValueError, match=r"'vgg'.*'cifar', 'imagenet'"):
    models.ResNet18('vgg')


def test_wrong_condition_shape_raises(small_models):
  generator, g_vars, discriminator, d_vars = small_models
  z, f, x = _inputs(32)
  with pytest.raises(ValueError, match='features of shape'):
    generator.apply(g_vars, z, f[:, :10], train=False)
  with pytest.raises(ValueError, match='features of shape'):
    discriminator.apply(d_vars, x, None, train=False)
  with pytest.raises(ValueError, match='images of shape'):
    discriminator.apply(d_vars, x[:, :16, :16], f, train=False)


def _numpy_batch_norm(x: np.ndarray) -> np.ndarray:
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(var + 1e-5)


def _numpy_instance_norm(x: np.ndarray) -> np.ndarray:
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5)


@pytest.mark.parametrize('kind', ['batch', 'instance'])
@pytest.mark.parametrize('centred_scale', [True, False])
def test_conditional_norm_by_hand(kind, centred_scale):
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(2, 3, 3, 4)).astype(np.float32)
  cond = rng.normal(size=(2, 5)).astype(np.float32)
  layer = layers.ConditionalNorm(kind, centred_scale)
  variables = layer.init(jax.random.key(0), x, cond, train=False)

  scale_kernel = rng.normal(size=(5, 4)).astype(np.float32)
  scale_bias = rng.normal(size=(4,)).astype(np.float32)
  bias_kernel = rng.normal(size=(5, 4)).astype(np.float32)
  bias_bias = rng.normal(size=(4,)).astype(np.float32)
  params = {
    'scale': {'kernel': scale_kernel, 'bias': scale_bias},
    'bias': {'kernel': bias_kernel, 'bias': bias_bias},
  }
  variables = {**variables, 'params': params}
  out, _ = layer.apply(variables, x, cond, train=True, mutable=['batch_stats'])

  normalized = _numpy_batch_norm(x) if kind == 'batch' else _numpy_instance_norm(x)
  scale = cond @ scale_kernel + scale_bias
  if centred_scale:
    scale = 1.0 + scale
  bias = cond @ bias_kernel + bias_bias
  expected = normalized * scale[:, None, None, :] + bias[:, None, None, :]
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_conditional_norm_zero_linears():
  # With zeroed linears, the centred layer is a plain normalisation and the other outputs 0.
  rng = np.random.default_rng(1)
  x = rng.normal(-1.0, 2.0, size=(3, 2, 2, 4)).astype(np.float32)
  cond = rng.normal(size=(3, 6)).astype(np.float32)
  for centred_scale, expected in [(True, _numpy_batch_norm(x)), (False, np.zeros_like(x))]:
    layer = layers.ConditionalNorm('batch', centred_scale)
    variables = layer.init(jax.random.key(0), x, cond, train=False)
    zeroed = jax.tree_util.tree_map(jnp.zeros_like, variables['params'])
    out, _ = layer.apply(
      {**variables, 'params': zeroed}, x, cond, train=True, mutable=['batch_stats']
    )
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_batch_norm_running_average_momentum():
  # Flax momentum 0.9 equals PyTorch momentum 0.1: new = 0.9 * old + 0.1 * batch statistic.
  x = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
  layer = layers.Normalization('batch', use_affine=True)
  variables = layer.init(jax.random.key(0), x, train=False)
  _, state = layer.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(
    np.asarray(state['batch_stats']['batch_norm']['mean']), 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-6
  )


def test_self_attention_starts_as_identity():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  layer = layers.SelfAttention()
  variables = layer.init(jax.random.key(1), x, train=False)
  out = layer.apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))

  params = {**variables['params'], 'gamma': jnp.array(0.5)}
  changed = layer.apply({**variables, 'params': params}, x, train=False)
  assert not bool(jnp.allclose(changed, x))
  shapes = jax.tree_util.tree_map(jnp.shape, variables['params'])
  assert shapes['query']['conv']['kernel'] == (1, 1, 16, 2)
  assert shapes['value']['conv']['kernel'] == (1, 1, 16, 8)
  assert shapes['output']['conv']['kernel'] == (1, 1, 8, 16)
  assert 'bias' not in shapes['query']['conv']


def test_resnet18_features():
  model = models.ResNet18('cifar')
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  variables = _init(model, x)
  features = _apply(model, variables, x, train=False)
  assert features.shape == (2, 512)
  assert features.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(features)))
  assert set(variables) == {'params', 'batch_stats'}

  imagenet = models.ResNet18('imagenet')
  x_large = jnp.zeros((2, 128, 128, 3))
  imagenet_vars = _abstract_variables(imagenet, x_large)
  out = jax.eval_shape(functools.partial(imagenet.apply, train=False), imagenet_vars, x_large)
  assert out.shape == (2, 512)


def test_bfloat16_models_build():
  z, f, x = _inputs(32, batch=2)
  generator = models.Generator(32, ch=8, dtype=jnp.bfloat16)
  discriminator = models.Discriminator(32, ch=8, dtype=jnp.bfloat16)
  g_vars = _abstract_variables(generator, z, f)
  d_vars = _abstract_variables(discriminator, x, f)
  images = jax.eval_shape(functools.partial(generator.apply, train=False), g_vars, z, f)
  logits = jax.eval_shape(functools.partial(discriminator.apply, train=False), d_vars, x, f)
  assert images.dtype == jnp.float32
  assert logits.dtype == jnp.float32
  # Parameters stay float32 for the optimiser.
  dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(g_vars['params'])}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_batch_stats_averaged_over_data_axis(small_models):
  # With axis_name set, BatchNorm inside shard_map uses the global batch's statistics, so the
  # sharded forward pass equals the single-device one on the whole batch.
  generator, g_vars, _, _ = small_models
  devices = np.array(jax.devices()[:4])
  if devices.size < 4:
    pytest.skip('needs 4 devices; tests/conftest.py fakes 4 CPU devices')
  mesh = Mesh(devices, ('data',))
  z, f, _ = _inputs(32, batch=8, seed=6)
  sharded_generator = models.Generator(32, ch=8, axis_name='data')

  def forward(variables, z, f):
    images, state = sharded_generator.apply(
      variables, z, f, train=True, mutable=['batch_stats', 'spectral']
    )
    return images, state['batch_stats']

  sharded = jax.jit(
    jax.shard_map(
      forward,
      mesh=mesh,
      in_specs=(PartitionSpec(), PartitionSpec('data'), PartitionSpec('data')),
      out_specs=(PartitionSpec('data'), PartitionSpec()),
      check_vma=False,
    )
  )
  images, batch_stats = sharded(g_vars, z, f)
  expected, expected_state = _apply(generator, g_vars, z, f, train=True)
  np.testing.assert_allclose(np.asarray(images), np.asarray(expected), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(batch_stats['out_norm']['batch_norm']['var']),
    np.asarray(expected_state['batch_stats']['out_norm']['batch_norm']['var']),
    rtol=1e-4,
  )

"""Tests of the pretrained-weights .npz format, its loader and the torchvision converter.

PyTorch is not needed: the torchvision state dict is faked with numpy arrays of the real shapes.
"""

import functools
import importlib.util
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from opengan_jax import pretrained
from opengan_jax.metric_learning import ExtractorState
from opengan_jax.models import ResNet18

IMAGE_SIZE = 32
BN_EPSILON = 1e-5  # torchvision's BatchNorm2d default, the same as the model's.


def _torchvision_resnet18_shapes() -> dict[str, tuple[int, ...]]:
  """Return the parameter and buffer shapes of torchvision's resnet18() state dict.

  They follow from the architecture: a 64-channel 7x7 stem conv on RGB, then four layers of
  two BasicBlocks with 64, 128, 256 and 512 channels. The first block of layers 2-4 halves the
  resolution and has a 1x1 downsample conv and BatchNorm. A 1000-class fc follows.
  """
  shapes = {'conv1.weight': (64, 3, 7, 7)}

  def batch_norm(prefix, channels):
    for entry in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{prefix}.{entry}'] = (channels,)
    shapes[f'{prefix}.num_batches_tracked'] = ()

  batch_norm('bn1', 64)
  in_channels = 64
  for layer, channels in enumerate((64, 128, 256, 512), start=1):
    for block in range(2):
      prefix = f'layer{layer}.{block}'
      block_in = in_channels if block == 0 else channels
      shapes[f'{prefix}.conv1.weight'] = (channels, block_in, 3, 3)
      batch_norm(f'{prefix}.bn1', channels)
      shapes[f'{prefix}.conv2.weight'] = (channels, channels, 3, 3)
      batch_norm(f'{prefix}.bn2', channels)
      if block == 0 and layer > 1:
        shapes[f'{prefix}.downsample.0.weight'] = (channels, block_in, 1, 1)
        batch_norm(f'{prefix}.downsample.1', channels)
    in_channels = channels
  shapes['fc.weight'] = (1000, 512)
  shapes['fc.bias'] = (1000,)
  return shapes


def _fake_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Return a torchvision-layout ResNet18 state dict of random values of the right scale."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, shape in _torchvision_resnet18_shapes().items():
    if key.endswith('num_batches_tracked'):
      value = np.array(1000, np.int64)
    elif key.endswith('running_var'):
      value = rng.uniform(0.5, 2.0, shape)
    elif key.endswith('.weight') and len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif key.endswith('.weight') and len(shape) == 1:  # BatchNorm scale.
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    state_dict[key] = np.asarray(value, np.float32 if value.dtype.kind == 'f' else value.dtype)
  return state_dict


@functools.cache
def _abstract_variables(stem: str):
  model = ResNet18(stem=stem)
  dummy = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, train=False))


def _random_variables(stem: str, seed: int = 0):
  """Return ResNet18 variables of the model's shapes and dtypes with random values.

  Random values stand in for a real init, which takes many seconds to compile on a CPU.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype), _abstract_variables(stem)
  )


def _write_npz(path, arrays) -> str:
  with open(path, 'wb') as f:
    np.savez(f, **arrays)
  return str(path)


def _images(seed: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.uniform(-1.0, 1.0, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def state_dict():
  return _fake_state_dict()


@pytest.fixture(scope='module')
def converted_file(state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp('weights') / 'resnet18.npz'
  return _write_npz(path, pretrained.convert_torchvision_resnet18(state_dict))


# --------------------------------------------------------------------------------------------------
# Converter.


def test_convert_covers_every_model_variable(state_dict):
  converted = pretrained.convert_torchvision_resnet18(state_dict)
  expected = traverse_util.flatten_dict(_abstract_variables('imagenet'), sep='/')
  assert set(converted) == set(expected)
  for key, target in expected.items():
    assert converted[key].shape == target.shape, key
    assert converted[key].dtype == np.float32, key


def test_convert_drops_classifier_and_counters(state_dict):
  converted = pretrained.convert_torchvision_resnet18(state_dict)
  assert not any('fc' in key.split('/') for key in converted)
  num_counters = sum(key.endswith('num_batches_tracked') for key in state_dict)
  assert len(converted) == len(state_dict) - 2 - num_counters


def test_convert_maps_names_and_layouts(state_dict):
  converted = pretrained.convert_torchvision_resnet18(state_dict)
  np.testing.assert_array_equal(
    converted['params/stage1_block0/shortcut_conv/kernel'],
    state_dict['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    converted['batch_stats/stage3_block1/bn2/batch_norm/var'],
    state_dict['layer4.1.bn2.running_var'],
  )
  np.testing.assert_array_equal(
    converted['params/stem_bn/batch_norm/scale'], state_dict['bn1.weight']
  )


def test_convert_rejects_unknown_key(state_dict):
  wrapped = {f'module.{key}': value for key, value in state_dict.items()}
  with pytest.raises(ValueError, match=r"'module\.conv1\.weight'.*prefix"):
    pretrained.convert_torchvision_resnet18(wrapped)


def test_stem_kernel_matches_torch_convolution(state_dict, converted_file):
  """The HWIO stem kernel computes the same convolution as the OIHW one in PyTorch's layout."""
  model = ResNet18(stem='imagenet')
  variables = pretrained.load_extractor_weights(converted_file, _abstract_variables('imagenet'))
  images = _images()
  _, state = model.apply(variables, images, train=False, capture_intermediates=True)
  (stem_output,) = state['intermediates']['stem_conv']['__call__']

  expected = jax.lax.conv_general_dilated(
    images.transpose(0, 3, 1, 2),
    state_dict['conv1.weight'],
    window_strides=(2, 2),
    padding=((3, 3), (3, 3)),
    dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
    precision=jax.lax.Precision.HIGHEST,
  )
  np.testing.assert_allclose(stem_output.transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4)


def _torch_layout_resnet18(state_dict, images_nchw):
  """Return eval-mode ResNet18 features computed directly from torchvision-named NCHW weights."""

  def conv(x, name, stride):
    weight = state_dict[f'{name}.weight']
    pad = (weight.shape[-1] - 1) // 2
    return jax.lax.conv_general_dilated(
      x,
      weight,
      window_strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
      precision=jax.lax.Precision.HIGHEST,
    )

  def batch_norm(x, name):
    per_channel = lambda entry: state_dict[f'{name}.{entry}'][None, :, None, None]  # noqa: E731
    normalised = (x - per_channel('running_mean')) / jnp.sqrt(
      per_channel('running_var') + BN_EPSILON
    )
    return normalised * per_channel('weight') + per_channel('bias')

  h = jax.nn.relu(batch_norm(conv(images_nchw, 'conv1', 2), 'bn1'))
  h = jax.lax.reduce_window(
    h, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), ((0, 0), (0, 0), (1, 1), (1, 1))
  )
  for layer in range(1, 5):
    for block in range(2):
      prefix = f'layer{layer}.{block}'
      stride = 2 if layer > 1 and block == 0 else 1
      out = jax.nn.relu(batch_norm(conv(h, f'{prefix}.conv1', stride), f'{prefix}.bn1'))
      out = batch_norm(conv(out, f'{prefix}.conv2', 1), f'{prefix}.bn2')
      shortcut = h
      if f'{prefix}.downsample.0.weight' in state_dict:
        shortcut = batch_norm(conv(h, f'{prefix}.downsample.0', stride), f'{prefix}.downsample.1')
      h = jax.nn.relu(out + shortcut)
  return jnp.mean(h, axis=(2, 3))


def test_loaded_model_matches_torch_layout_forward(state_dict, converted_file):
  """Every converted layer, BatchNorm statistic and block index is where the model uses it."""
  model = ResNet18(stem='imagenet')
  variables = pretrained.load_extractor_weights(converted_file, _abstract_variables('imagenet'))
  images = _images()
  with jax.default_matmul_precision('highest'):
    features = model.apply(variables, images, train=False)
  expected = _torch_layout_resnet18(state_dict, images.transpose(0, 3, 1, 2))
  assert features.shape == (2, 512)
  np.testing.assert_allclose(features, expected, rtol=1e-3, atol=1e-4)


def test_folded_normalization_matches_normalised_input(state_dict):
  """Away from the border, folding gives the stem BatchNorm output of normalised images."""
  model = ResNet18(stem='imagenet')
  plain = traverse_util.unflatten_dict(pretrained.convert_torchvision_resnet18(state_dict), sep='/')
  folded = traverse_util.unflatten_dict(
    pretrained.convert_torchvision_resnet18(state_dict, fold_imagenet_normalization=True), sep='/'
  )
  images = _images()
  mean = np.asarray(pretrained.IMAGENET_MEAN, np.float32)
  std = np.asarray(pretrained.IMAGENET_STD, np.float32)
  normalised = ((images + 1.0) / 2.0 - mean) / std

  def stem_bn_output(variables, x):
    with jax.default_matmul_precision('highest'):
      _, state = model.apply(variables, x, train=False, capture_intermediates=True)
    return np.asarray(state['intermediates']['stem_bn']['__call__'][0])

  expected = stem_bn_output(plain, normalised)
  actual = stem_bn_output(folded, images)
  # Stem outputs 2..6 of 16 read no padding (7x7 kernel, stride 2, padding 3).
  interior = slice(2, IMAGE_SIZE // 2 - 1)
  np.testing.assert_allclose(
    actual[:, interior, interior], expected[:, interior, interior], rtol=1e-3, atol=1e-3
  )
  assert not np.allclose(stem_bn_output(plain, images), expected, atol=1e-2)


# --------------------------------------------------------------------------------------------------
# Loader.


def test_save_load_round_trip(tmp_path):
  variables = _random_variables('cifar', seed=3)
  path = tmp_path / 'weights.npz'
  pretrained.save_extractor_weights(path, variables)
  loaded = pretrained.load_extractor_weights(path, _random_variables('cifar', seed=4))
  expected = traverse_util.flatten_dict(variables, sep='/')
  actual = traverse_util.flatten_dict(loaded, sep='/')
  assert set(actual) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def test_cifar_stem_rejects_imagenet_weights(converted_file):
  with pytest.raises(ValueError) as error:
    pretrained.load_extractor_weights(converted_file, _abstract_variables('cifar'))
  message = str(error.value)
  assert "'params/stem_conv/kernel'" in message
  assert '(7, 7, 3, 64)' in message
  assert '(3, 3, 3, 64)' in message
  assert '--config.extractor.stem=imagenet' in message


def test_missing_file_raises(tmp_path):
  path = tmp_path / 'absent.npz'
  with pytest.raises(FileNotFoundError, match='absent.npz'):
    pretrained.load_extractor_weights(path, _abstract_variables('cifar'))


def test_wrong_shape_names_key(tmp_path):
  arrays = pretrained.flatten_variables(_random_variables('cifar'))
  key = 'params/stage2_block1/bn1/batch_norm/bias'
  arrays[key] = np.zeros((255,), np.float32)
  path = _write_npz(tmp_path / 'wrong.npz', arrays)
  with pytest.raises(ValueError) as error:
    pretrained.load_extractor_weights(path, _abstract_variables('cifar'))
  message = str(error.value)
  assert repr(key) in message
  assert '(255,)' in message
  assert '(256,)' in message


def test_missing_key_names_key(tmp_path):
  arrays = pretrained.flatten_variables(_random_variables('cifar'))
  key = 'batch_stats/stage1_block0/shortcut_bn/batch_norm/mean'
  del arrays[key]
  path = _write_npz(tmp_path / 'incomplete.npz', arrays)
  with pytest.raises(ValueError, match=f"is missing 1 of the .*'{key}'"):
    pretrained.load_extractor_weights(path, _abstract_variables('cifar'))


def test_extra_keys_ignored(tmp_path):
  variables = _random_variables('cifar')
  arrays = pretrained.flatten_variables(variables)
  arrays['params/fc/kernel'] = np.ones((512, 1000), np.float32)
  path = _write_npz(tmp_path / 'extra.npz', arrays)
  loaded = pretrained.load_extractor_weights(path, _abstract_variables('cifar'))
  assert set(traverse_util.flatten_dict(loaded, sep='/')) == set(
    traverse_util.flatten_dict(variables, sep='/')
  )


def test_object_array_rejected(tmp_path):
  arrays = pretrained.flatten_variables(_random_variables('cifar'))
  arrays['params/stem_conv/kernel'] = np.array([{'not': 'numbers'}], dtype=object)
  path = tmp_path / 'objects.npz'
  with open(path, 'wb') as f:
    np.savez(f, **arrays)  # np.savez pickles object arrays; np.load must not unpickle them.
  with pytest.raises(ValueError, match=r"'params/stem_conv/kernel' is a Python object array"):
    pretrained.load_extractor_weights(path, _abstract_variables('cifar'))


def test_pickle_file_rejected(tmp_path):
  path = tmp_path / 'legacy.pth'
  path.write_bytes(pickle.dumps({'conv1.weight': [0.0]}))
  with pytest.raises(ValueError, match='not an .npz of arrays.*convert'):
    pretrained.load_extractor_weights(path, _abstract_variables('imagenet'))


def test_init_state_resets_optimizer(converted_file):
  tx = optax.adam(1e-3)
  params = _random_variables('imagenet')['params']
  stale = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[1]
  state = ExtractorState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=_random_variables('imagenet')['batch_stats'],
    opt_state=stale,
    tx=tx,
  )
  loaded = pretrained.init_state_from_file(state, converted_file)
  file_values = np.load(converted_file, allow_pickle=False)
  np.testing.assert_array_equal(
    loaded.params['stem_conv']['kernel'], file_values['params/stem_conv/kernel']
  )
  np.testing.assert_array_equal(
    loaded.batch_stats['stem_bn']['batch_norm']['var'],
    file_values['batch_stats/stem_bn/batch_norm/var'],
  )
  fresh = jax.tree.leaves(tx.init(loaded.params))
  for actual, expected in zip(jax.tree.leaves(loaded.opt_state), fresh, strict=True):
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.skipif(importlib.util.find_spec('torch') is not None, reason='PyTorch is installed')
def test_convert_command_without_torch(tmp_path):
  with pytest.raises(SystemExit, match='pip install torch'):
    pretrained.main(['convert', '--input', str(tmp_path / 'r.pth'), '--output', 'r.npz'])


def test_convert_command_writes_loadable_npz(state_dict, tmp_path, monkeypatch):
  monkeypatch.setattr(pretrained, 'read_torch_state_dict', lambda path: state_dict)
  output = tmp_path / 'resnet18.npz'
  pretrained.main(['convert', '--input', 'resnet18.pth', '--output', str(output)])
  loaded = pretrained.load_extractor_weights(output, _abstract_variables('imagenet'))
  folded = pretrained.convert_torchvision_resnet18(state_dict, fold_imagenet_normalization=True)
  actual = traverse_util.flatten_dict(loaded, sep='/')
  assert set(actual) == set(folded)
  for key, value in folded.items():
    np.testing.assert_array_equal(actual[key], value, err_msg=key)

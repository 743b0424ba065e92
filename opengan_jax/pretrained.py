"""Pretrained ResNet18 weights for the feature extractor F: the .npz format, its loader and converter.

The .npz contains one float32 array per Flax variable of `models.ResNet18`, keyed by its
'/'-joined path ('params/stem_conv/kernel', 'batch_stats/stem_bn/batch_norm/mean', ...), with
conv kernels in Flax's HWIO layout. It is read with `allow_pickle=False`, so loading it runs no
code.

Make one from torchvision's ImageNet ResNet18 file (PyTorch needed for this step only):

  python -m opengan_jax.pretrained convert --input resnet18-f37072fd.pth --output resnet18.npz
"""

import argparse
import os
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

# torchvision normalises ImageNet inputs in [0, 1] with these per-channel (R, G, B) statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CONVERT_COMMAND = 'python -m opengan_jax.pretrained convert --input FILE.pth --output FILE.npz'
_SEPARATOR = '/'
_STEM_KERNEL = 'params/stem_conv/kernel'
# Kernel side of the stem conv for each ResNet18 stem (see models/resnet.py).
_STEM_BY_KERNEL_SIDE = {3: 'cifar', 7: 'imagenet'}
_MAX_NAMED_KEYS = 5

# torchvision BatchNorm2d entry -> (collection, Flax variable name).
_BATCH_NORM_NAMES = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}
# Entries of a torchvision ResNet18 state dict that F does not use.
_DROPPED = re.compile(r'^fc\.(weight|bias)$|\.num_batches_tracked$')
_BLOCK_KEY = re.compile(r'^layer([1-4])\.([01])\.(.+)$')
_BLOCK_LAYERS = {
  'conv1': 'conv1',
  'conv2': 'conv2',
  'bn1': 'bn1',
  'bn2': 'bn2',
  'downsample.0': 'shortcut_conv',
  'downsample.1': 'shortcut_bn',
}
_CONV_LAYERS = ('stem_conv', 'conv1', 'conv2', 'shortcut_conv')


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Return the variables as {'/'-joined path: numpy array}, the layout of the .npz file."""
  flat = traverse_util.flatten_dict(variables, sep=_SEPARATOR)
  return {key: np.asarray(value) for key, value in flat.items()}


def save_extractor_weights(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
  """Write F's variables ('params' and 'batch_stats') to an .npz that `load_extractor_weights` reads."""
  flat = {key: np.asarray(value, np.float32) for key, value in flatten_variables(variables).items()}
  with open(path, 'wb') as f:
    np.savez(f, **flat)


def read_npz_arrays(path: str | os.PathLike, convert_command: str) -> dict[str, np.ndarray]:
  """Return the named arrays of an .npz file without unpickling anything.

  `convert_command` is the command that turns a PyTorch file into such an .npz; error messages
  name it.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'weights file not found: {path}')
  try:
    data = np.load(path, allow_pickle=False)
  except ValueError as error:  # numpy raises this for a pickle, such as a legacy .pth file.
    raise ValueError(
      f'{path} is not an .npz of arrays ({error}). Convert a PyTorch .pth file first with '
      f'`{convert_command}`.'
    ) from error
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(
      f'{path} contains a single array, not an .npz of named arrays; write it with '
      f'`{convert_command}`.'
    )
  arrays = {}
  with data:
    for key in data.files:
      try:
        arrays[key] = data[key]
      except ValueError as error:
        raise ValueError(
          f'{path}: entry {key!r} is a Python object array, which is not read because loading '
          'it could run code. Store numeric arrays only.'
        ) from error
      except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f'{path}: entry {key!r} cannot be read: {error}') from error
  return arrays


def _shape_hint(key: str, file_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> str:
  if key == _STEM_KERNEL and len(file_shape) == 4 and file_shape[0] in _STEM_BY_KERNEL_SIDE:
    stem = _STEM_BY_KERNEL_SIDE[file_shape[0]]
    return (
      f'This file is for the {stem} stem ({file_shape[0]}x{file_shape[1]} stem conv); set '
      f'--config.extractor.stem={stem}, or unset --config.extractor.init_weights to train from '
      'scratch.'
    )
  return 'The file was written for another network; convert the weights of the same ResNet18.'


def load_extractor_weights(path: str | os.PathLike, variables: Mapping[str, Any]) -> dict[str, Any]:
  """Read an .npz of F's variables and return them in the structure and dtypes of `variables`.

  Args:
    path: .npz written by `save_extractor_weights` or the convert command.
    variables: F's variables (arrays, or `jax.ShapeDtypeStruct`s from `jax.eval_shape`) that
      fix the expected keys, shapes and dtypes, e.g. {'params': ..., 'batch_stats': ...}.

  Returns:
    A nested dict like `variables` holding the file's arrays. Keys in the file that the model
    lacks (for example a classifier) are ignored and counted in the log.

  Raises:
    FileNotFoundError: if `path` is not a file.
    ValueError: if the file is not an .npz of numeric arrays, lacks a key of the model, or
      contains an array of another shape than the model's.
  """
  arrays = read_npz_arrays(path, CONVERT_COMMAND)
  expected = traverse_util.flatten_dict(variables, sep=_SEPARATOR)

  missing = sorted(key for key in expected if key not in arrays)
  if missing:
    named = ', '.join(repr(key) for key in missing[:_MAX_NAMED_KEYS])
    more = f' and {len(missing) - _MAX_NAMED_KEYS} more' if len(missing) > _MAX_NAMED_KEYS else ''
    hint = 'Write the file with the convert command or save_extractor_weights.'
    if not any(key.startswith('params/') for key in arrays):
      hint = "The file has no 'params/...' entries, so it is not in this project's format. " + hint
    raise ValueError(
      f'{path} is missing {len(missing)} of the {len(expected)} variables of the extractor: '
      f'{named}{more}. {hint}'
    )

  loaded = {}
  for key, target in expected.items():
    array = arrays[key]
    if tuple(array.shape) != tuple(target.shape):
      raise ValueError(
        f'{path}: {key!r} has shape {tuple(array.shape)} in the file but '
        f'{tuple(target.shape)} in the model. {_shape_hint(key, array.shape, target.shape)}'
      )
    if not np.issubdtype(array.dtype, np.floating):
      raise ValueError(
        f'{path}: {key!r} has dtype {array.dtype}; a floating-point array is expected.'
      )
    loaded[key] = jnp.asarray(array, dtype=target.dtype)

  extra = sorted(set(arrays) - set(expected))
  logging.info(
    'Loaded %d extractor variables from %s; ignored %d entries the model does not use%s.',
    len(loaded),
    path,
    len(extra),
    f' ({", ".join(extra[:_MAX_NAMED_KEYS])}{", ..." if len(extra) > _MAX_NAMED_KEYS else ""})'
    if extra
    else '',
  )
  return traverse_util.unflatten_dict(loaded, sep=_SEPARATOR)


def init_state_from_file(state: Any, path: str | os.PathLike) -> Any:
  """Return the extractor train state with weights from `path` and a fresh Adam state for them.

  `state` is a `metric_learning.ExtractorState`; its step is kept.
  """
  variables = load_extractor_weights(
    path, {'params': state.params, 'batch_stats': state.batch_stats}
  )
  params = variables['params']
  return state.replace(
    params=params,
    batch_stats=variables['batch_stats'],
    opt_state=state.tx.init(params),
  )


def _flax_key(torch_key: str) -> tuple[str, str] | None:
  """Return (collection, path below it) for one torchvision key, or None to drop it."""
  if _DROPPED.search(torch_key):
    return None
  layer, _, entry = torch_key.rpartition('.')
  if layer in ('conv1', 'bn1'):
    module = 'stem_conv' if layer == 'conv1' else 'stem_bn'
  else:
    match = _BLOCK_KEY.match(layer)
    if not match or match.group(3) not in _BLOCK_LAYERS:
      raise ValueError(
        f'unexpected key {torch_key!r}: not part of a torchvision ResNet18 state dict. Keys '
        "saved from a wrapped model may carry a prefix such as 'module.'; remove it first."
      )
    stage = int(match.group(1)) - 1
    module = f'stage{stage}_block{match.group(2)}/{_BLOCK_LAYERS[match.group(3)]}'

  if module.rpartition('/')[2] in _CONV_LAYERS:
    if entry != 'weight':
      raise ValueError(f'unexpected key {torch_key!r}: ResNet18 convs have only a weight.')
    return 'params', f'{module}/kernel'
  if entry not in _BATCH_NORM_NAMES:
    raise ValueError(f'unexpected key {torch_key!r}: not a BatchNorm entry of ResNet18.')
  collection, name = _BATCH_NORM_NAMES[entry]
  return collection, f'{module}/batch_norm/{name}'


def convert_torchvision_resnet18(
  state_dict: Mapping[str, Any], *, fold_imagenet_normalization: bool = False
) -> dict[str, np.ndarray]:
  """Map a torchvision ResNet18 state dict to the .npz layout of F (float32, HWIO kernels).

  The classifier ('fc.*') and BatchNorm counters ('num_batches_tracked') are dropped.

  Args:
    state_dict: torchvision names ('conv1.weight', 'layer2.0.downsample.1.running_var', ...)
      to arrays; conv weights in PyTorch's OIHW layout.
    fold_imagenet_normalization: Whether to fold torchvision's input normalisation into the
      stem, so that F, which takes images in [-1, 1] as they are, computes what the ImageNet
      network computes on normalised images. The stem conv is scaled per input channel and
      the stem BatchNorm's running mean absorbs the shift. This is exact away from the image
      border, where zero padding of the raw image differs from zero padding of the normalised one.

  Raises:
    ValueError: on a key that torchvision's ResNet18 does not have, or a conv weight that is
      not 4-D.
  """
  converted = {}
  for torch_key, value in state_dict.items():
    target = _flax_key(torch_key)
    if target is None:
      continue
    collection, path = target
    array = np.asarray(value, np.float32)
    if path.endswith('/kernel'):
      if array.ndim != 4:
        raise ValueError(
          f'{torch_key!r} has shape {array.shape}; a 4-D (out, in, height, width) conv weight '
          'is expected.'
        )
      array = np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO.
    converted[f'{collection}/{path}'] = array
  if fold_imagenet_normalization:
    converted = _fold_normalization(converted)
  return converted


def _fold_normalization(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # A [-1, 1] image x is (x + 1) / 2 in [0, 1]; normalised, that is x * scale + shift.
  std = np.asarray(IMAGENET_STD, np.float32)
  scale = 0.5 / std
  shift = (0.5 - np.asarray(IMAGENET_MEAN, np.float32)) / std
  kernel_key = _STEM_KERNEL
  mean_key = 'batch_stats/stem_bn/batch_norm/mean'
  for key in (kernel_key, mean_key):
    if key not in weights:
      raise ValueError(f'cannot fold the input normalisation: {key!r} is missing.')
  kernel = weights[kernel_key]  # (H, W, 3, 64)
  folded = dict(weights)
  folded[kernel_key] = kernel * scale[None, None, :, None]
  # Away from the border, conv(x * scale + shift) = conv'(x) + sum of kernel * shift.
  folded[mean_key] = weights[mean_key] - np.einsum('hwio,i->o', kernel, shift)
  return folded


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Return a PyTorch .pth state dict as numpy arrays (needs PyTorch, loads tensors only)."""
  try:
    import torch  # noqa: PLC0415  (optional: only the conversion needs PyTorch)
  except ImportError as error:
    raise SystemExit(
      'reading a .pth file needs PyTorch, which opengan-jax does not otherwise use: run '
      '`pip install torch` for the conversion only (on any machine), then copy the .npz here.'
    ) from error
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise SystemExit(f'{path} contains a {type(state_dict).__name__}, not a state dict.')
  return {key: value.detach().cpu().numpy() for key, value in state_dict.items()}


def _check_against_model(weights: Mapping[str, np.ndarray]) -> None:
  from opengan_jax.models import ResNet18  # noqa: PLC0415

  model = ResNet18(stem='imagenet')
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  )
  expected = traverse_util.flatten_dict(shapes, sep=_SEPARATOR)
  for key, target in expected.items():
    if key not in weights:
      raise SystemExit(f'the converted weights are missing {key!r}; is the input a ResNet18?')
    if weights[key].shape != target.shape:
      raise SystemExit(
        f'{key!r} has shape {weights[key].shape} but ResNet18 expects {target.shape}; '
        'is the input a ResNet18?'
      )


def main(argv: Sequence[str] | None = None) -> None:
  """Run the command line: `convert --input FILE.pth --output FILE.npz`."""
  parser = argparse.ArgumentParser(prog='python -m opengan_jax.pretrained', description=__doc__)
  commands = parser.add_subparsers(dest='command', required=True)
  convert = commands.add_parser(
    'convert', help='Convert a torchvision ResNet18 .pth state dict to an .npz for F.'
  )
  convert.add_argument('--input', required=True, help='torchvision ResNet18 state dict (.pth).')
  convert.add_argument('--output', required=True, help='.npz file to write.')
  convert.add_argument(
    '--fold-imagenet-normalization',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='Fold the ImageNet mean and standard deviation into the stem, because F takes images '
    'in [-1, 1] without normalising them (default: on).',
  )
  args = parser.parse_args(argv)

  logging.set_verbosity(logging.INFO)
  weights = convert_torchvision_resnet18(
    read_torch_state_dict(args.input),
    fold_imagenet_normalization=args.fold_imagenet_normalization,
  )
  _check_against_model(weights)
  with open(args.output, 'wb') as f:
    np.savez(f, **weights)
  logging.info(
    'Wrote %d arrays for the imagenet stem to %s (ImageNet normalisation folded in: %s).',
    len(weights),
    args.output,
    args.fold_imagenet_normalization,
  )


if __name__ == '__main__':
  main(sys.argv[1:])

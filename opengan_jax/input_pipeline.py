"""Dataset loading: decoded images split into training and novel classes, and batching.

load_class_split decodes a whole dataset once into uint8 arrays of the training resolution and
caches them as .npz; BatchSampler then serves deterministic batches from memory.
Sources (config.dataset.source):
  'folder': image_dir/<class>/<image>, classes in sorted folder-name order; or, with
    identity_file, a flat folder of CelebA images with identities as classes, most images first.
  'tfds': the tfds dataset `name` (oxford_flowers102, celeb_a, or one with a ClassLabel 'label').
  'tfds_image_folder': image_dir/<split>/<class>/<image> read by tfds.folder_dataset.ImageFolder.
  'digits': scikit-learn's bundled 8x8 handwritten digits, a demo that needs no files.
"""

import dataclasses
import hashlib
import os
import re
import tempfile
import time

import ml_collections
import numpy as np
from absl import logging

from opengan_jax.data import folder as folder_source
from opengan_jax.data.labeled_images import LabeledImages
from opengan_jax.data.sampler import BatchSampler, prefetch_batches, sample_sources, to_float

__all__ = [
  'BatchSampler',
  'ClassSplit',
  'load_class_split',
  'prefetch_batches',
  'sample_sources',
  'split_classes',
  'to_float',
]

SOURCES = ('folder', 'tfds', 'tfds_image_folder', 'digits')
# Part of every cache key; bump it when the decoding changes so old caches are not reused.
_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ClassSplit:
  """Images of the training classes and of the novel classes, labelled from 0 in each."""

  train_images: np.ndarray  # uint8 (N, R, R, 3)
  train_labels: np.ndarray  # int32 (N,)
  novel_images: np.ndarray  # uint8 (M, R, R, 3)
  novel_labels: np.ndarray  # int32 (M,)
  train_class_names: tuple[str, ...]
  novel_class_names: tuple[str, ...]
  num_skipped: int  # Files that could not be read (named in the log).


def split_classes(data: LabeledImages, num_train_classes: int) -> ClassSplit:
  """Make classes 0..num_train_classes-1 the training classes and the rest the novel classes."""
  num_classes = len(data.class_names)
  if not 0 < num_train_classes < num_classes:
    raise ValueError(
      f'dataset.num_train_classes={num_train_classes} leaves no training or no novel classes: '
      f'the dataset has {num_classes} classes, so set it between 1 and {num_classes - 1}'
    )
  is_train = data.labels < num_train_classes
  return ClassSplit(
    train_images=data.images[is_train],
    train_labels=data.labels[is_train].astype(np.int32),
    novel_images=data.images[~is_train],
    novel_labels=(data.labels[~is_train] - num_train_classes).astype(np.int32),
    train_class_names=tuple(data.class_names[:num_train_classes]),
    novel_class_names=tuple(data.class_names[num_train_classes:]),
    num_skipped=len(data.skipped_files),
  )


def _safe_name(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_') or 'data'


def _read_cache(path: str) -> LabeledImages | None:
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as cached:
    return LabeledImages(
      images=cached['images'],
      labels=cached['labels'],
      class_names=tuple(str(name) for name in cached['class_names']),
      skipped_files=tuple(str(name) for name in cached['skipped_files']),
    )


def _write_cache(path: str, data: LabeledImages) -> None:
  """Write `data` to `path` atomically: a temporary file in the same folder, then a rename."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  handle, temporary_path = tempfile.mkstemp(dir=directory, suffix='.npz.tmp')
  try:
    with os.fdopen(handle, 'wb') as file:
      np.savez(
        file,
        images=data.images,
        labels=data.labels,
        class_names=np.asarray(data.class_names, dtype=str),
        skipped_files=np.asarray(data.skipped_files, dtype=str),
      )
    os.replace(temporary_path, path)
  except BaseException:
    os.unlink(temporary_path)
    raise


def _cached(cache_dir: str | None, key: str, load_fn) -> LabeledImages:
  """Return the cached arrays for `key`, or call load_fn and cache its result."""
  path = None if cache_dir is None else os.path.join(cache_dir, f'{key}.npz')
  if path is not None:
    data = _read_cache(path)
    if data is not None:
      logging.info('Loaded %d decoded images from cache %s', len(data.images), path)
      if data.skipped_files:
        logging.warning(
          '%d unreadable files were skipped when the cache was written: %s',
          len(data.skipped_files),
          ', '.join(data.skipped_files[:5]),
        )
      return data
  start = time.perf_counter()
  data = load_fn()
  logging.info('Decoded %d images in %.1f s', len(data.images), time.perf_counter() - start)
  if path is not None:
    _write_cache(path, data)
    logging.info('Cached decoded images in %s', path)
  return data


def _hash_key(*parts: str) -> str:
  text = '\n'.join((f'format {_CACHE_FORMAT}', *parts))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_folder(config: ml_collections.ConfigDict, resolution: int, cache_dir: str | None):
  image_dir = folder_source.check_image_dir(config.image_dir)
  if config.identity_file is None:
    class_folders = folder_source.list_class_folders(image_dir)
  else:
    class_folders = folder_source.list_identity_classes(image_dir, config.identity_file)
  name = _safe_name(os.path.basename(os.path.abspath(image_dir)))
  key = f'folder-{name}-{resolution}px-{_hash_key(folder_source.fingerprint(class_folders))}'
  return _cached(cache_dir, key, lambda: folder_source.load_folder(class_folders, resolution))


def _load_tfds(config: ml_collections.ConfigDict, resolution: int, cache_dir: str | None):
  from opengan_jax.data import tfds_source  # Imports TensorFlow, so only when needed.

  builder = tfds_source.make_builder(config.name, config.data_dir)
  key = f'tfds-{_safe_name(builder.info.full_name)}-{resolution}px-{_hash_key()}'

  def load():
    tfds_source.prepare(builder, config.manual_dir)
    return tfds_source.load_builder(builder, resolution)

  return _cached(cache_dir, key, load)


def _load_tfds_image_folder(
  config: ml_collections.ConfigDict, resolution: int, cache_dir: str | None
):
  import tensorflow_datasets as tfds

  from opengan_jax.data import tfds_source

  root = folder_source.check_image_dir(config.image_dir)
  fingerprints = []
  for split in folder_source.list_class_folders(root, kind='split'):
    class_folders = folder_source.list_class_folders(split.path)
    fingerprints.append(f'{split.name} {folder_source.fingerprint(class_folders)}')
  name = _safe_name(os.path.basename(os.path.abspath(root)))
  key = f'tfds_image_folder-{name}-{resolution}px-{_hash_key(*fingerprints)}'

  def load():
    builder = tfds.folder_dataset.ImageFolder(root)
    return tfds_source.load_builder(builder, resolution)

  return _cached(cache_dir, key, load)


def _load_digits(config: ml_collections.ConfigDict, resolution: int, cache_dir: str | None):
  del config, cache_dir  # Decoding the digits takes well under a second, so they are not cached.
  from opengan_jax.data import digits

  return digits.load_digits(resolution)


_LOADERS = {
  'folder': _load_folder,
  'tfds': _load_tfds,
  'tfds_image_folder': _load_tfds_image_folder,
  'digits': _load_digits,
}


def load_class_split(
  dataset_config: ml_collections.ConfigDict, resolution: int, cache_dir: str | None
) -> ClassSplit:
  """Load the dataset of `dataset_config` at `resolution` and split it by class.

  Images are resized so that the shorter side is `resolution` (antialiased) and centre
  cropped. Decoded arrays are cached under `cache_dir` (None: no cache), keyed by the source,
  its contents and the resolution.
  """
  if not isinstance(resolution, int | np.integer) or resolution <= 0:
    raise ValueError(f'resolution={resolution!r} must be a positive number of pixels, e.g. 64')
  source = dataset_config.source
  if source not in _LOADERS:
    raise ValueError(f'dataset.source={source!r} is invalid: use one of {", ".join(SOURCES)}')

  data = _LOADERS[source](dataset_config, int(resolution), cache_dir)
  split = split_classes(data, dataset_config.num_train_classes)
  logging.info(
    'Dataset %s at %d px: %d training images in %d classes, %d novel images in %d classes, '
    '%d files skipped',
    source,
    resolution,
    len(split.train_images),
    len(split.train_class_names),
    len(split.novel_images),
    len(split.novel_class_names),
    split.num_skipped,
  )
  return split

"""tensorflow_datasets source: a tfds builder read with tf.data, resized, collected to numpy."""

import collections
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from opengan_jax.data.labeled_images import LabeledImages

_READ_BATCH = 256


def make_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  return tfds.builder(name, data_dir=data_dir)


def _missing_manual_files(builder: tfds.core.DatasetBuilder, manual_dir: str) -> list[str]:
  """Return the archive file names from the builder's checksums that manual_dir lacks."""
  url_infos = type(builder).url_infos or {}
  names = sorted({info.filename for info in url_infos.values() if info.filename})
  return [name for name in names if not os.path.exists(os.path.join(manual_dir, name))]


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> None:
  """Run download_and_prepare, taking the original archives from `manual_dir` when it is set.

  tfds looks up each archive in manual_dir under the file name in its checksums and verifies
  its size and SHA-256 before use.
  """
  if builder.is_prepared():
    return
  name = builder.info.name
  download_config = None
  if manual_dir is not None:
    manual_dir = os.path.expanduser(manual_dir)
    missing = _missing_manual_files(builder, manual_dir)
    if missing:
      raise ValueError(
        f'tfds dataset {name!r} is not prepared and dataset.manual_dir={manual_dir!r} lacks its '
        f'original files: put {", ".join(missing)} in that folder (unchanged, as published by '
        'the dataset authors), or unset dataset.manual_dir to let tfds download them'
      )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  logging.info('Preparing tfds dataset %s in %s', name, builder.data_dir)
  builder.download_and_prepare(download_config=download_config)


def resize_crop(image: tf.Tensor, resolution: int) -> tf.Tensor:
  """Cut the centred square and resize it to resolution x resolution, returning uint8 RGB.

  Same result as resizing the shorter side to `resolution` and centre cropping; bicubic with
  antialiasing, as the Pillow path uses.
  """
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  side = tf.minimum(height, width)
  image = tf.image.crop_to_bounding_box(
    image, (height - side) // 2, (width - side) // 2, side, side
  )
  image = tf.image.resize(image, (resolution, resolution), method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def read_builder(
  builder: tfds.core.DatasetBuilder,
  resolution: int,
  label_fn: Callable[[dict], tf.Tensor],
) -> tuple[np.ndarray, np.ndarray]:
  """Read every split of `builder`, returning uint8 images and `label_fn(example)` labels."""
  images, labels = [], []
  for split in sorted(builder.info.splits.keys()):
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(
      lambda example: (resize_crop(example['image'], resolution), label_fn(example)),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    num_before = len(images)
    for image_batch, label_batch in dataset.batch(_READ_BATCH).as_numpy_iterator():
      images.append(image_batch)
      labels.append(label_batch)
    count = sum(len(batch) for batch in labels[num_before:])
    logging.info('Read %d images from tfds split %s of %s', count, split, builder.info.name)
  return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def load_class_labelled(builder: tfds.core.DatasetBuilder, resolution: int) -> LabeledImages:
  """Load a builder whose 'label' feature is a ClassLabel; classes keep the label order."""
  label_feature = builder.info.features['label']
  images, labels = read_builder(builder, resolution, lambda example: example['label'])
  return LabeledImages(
    images=images, labels=labels.astype(np.int32), class_names=tuple(label_feature.names)
  )


def load_celeb_a(builder: tfds.core.DatasetBuilder, resolution: int) -> LabeledImages:
  """Load celeb_a with identities as classes, ordered by image count (most first).

  tfds's celeb_a stores the identity of each image from version 2.1.0 on.
  """
  # NOTE: all 202,599 images are held in memory as uint8: about 2.5 GB at 64 px, 10 GB at
  # 128 px and 40 GB at 256 px, plus a second copy while the classes are split.
  if 'identity' not in builder.info.features:
    raise ValueError(
      f'tfds celeb_a version {builder.info.version} has no identity feature: prepare version '
      '2.1.0 or later (tensorflow-datasets 4.9.10 builds it), or use dataset.source=folder with '
      'one folder of images per identity'
    )
  images, identities = read_builder(
    builder, resolution, lambda example: example['identity']['Identity_No']
  )
  counts = collections.Counter(identities.tolist())
  # Most images first; ties by identity number, so the order is deterministic.
  ranked = sorted(counts, key=lambda identity: (-counts[identity], identity))
  rank_of = {identity: rank for rank, identity in enumerate(ranked)}
  labels = np.asarray([rank_of[identity] for identity in identities.tolist()], np.int32)
  return LabeledImages(
    images=images, labels=labels, class_names=tuple(str(identity) for identity in ranked)
  )


def load_builder(builder: tfds.core.DatasetBuilder, resolution: int) -> LabeledImages:
  """Load all splits of a prepared builder (celeb_a, or any dataset with a ClassLabel 'label')."""
  if builder.info.name == 'celeb_a':
    return load_celeb_a(builder, resolution)
  features = builder.info.features
  label_feature = features['label'] if 'label' in features else None
  if not isinstance(label_feature, tfds.features.ClassLabel):
    raise ValueError(
      f'tfds dataset {builder.info.name!r} has no ClassLabel feature named "label": use '
      'oxford_flowers102, celeb_a or another classification dataset, or dataset.source=folder'
    )
  return load_class_labelled(builder, resolution)

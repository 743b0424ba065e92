"""Tiny end-to-end training runs on real flower images, shared by the train and sampling tests.

Compiling the two training stages takes most of a run's time on a CPU, so one trained workdir is
built per test session and reused (read-only) by every test that only inspects or samples from it.
"""

import pathlib
import shutil

import ml_collections

from configs import default
from opengan_jax import train

# Four Flowers102 classes, the first three for training and the last one novel.
FLOWER_CLASSES = ('001', '002', '003', '004')
NUM_TRAIN_CLASSES = 3
IMAGES_PER_CLASS = 12
RESOLUTION = 32
NUM_STEPS = 4
NUM_SAMPLE_SOURCES = 2
SAMPLES_PER_SOURCE = 2

_trained_workdirs: dict[str, pathlib.Path] = {}


def link_flowers(flowers_dir: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  """Make root/<class>/ folders of symlinks to the first IMAGES_PER_CLASS images of each class."""
  for name in FLOWER_CLASSES:
    class_dir = root / name
    class_dir.mkdir(parents=True)
    for image in sorted((flowers_dir / name).glob('*.jpg'))[:IMAGES_PER_CLASS]:
      (class_dir / image.name).symlink_to(image)
  return root


def tiny_config(image_dir: pathlib.Path, cache_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """Return the default config shrunk to a few seconds of training per stage on a CPU."""
  config = default.get_config()
  config.dataset.source = 'folder'
  config.dataset.image_dir = str(image_dir)
  config.dataset.num_train_classes = NUM_TRAIN_CLASSES
  config.dataset.cache_dir = str(cache_dir)
  config.resolution = RESOLUTION
  config.batch_size = 8  # Two images on each of the 4 test devices.
  config.extractor.batch_size = 16
  config.extractor.num_epochs = 1
  config.extractor.eval_batch_size = 64
  config.model.ch = 8
  config.gan.num_steps = NUM_STEPS
  config.log_every_steps = 2
  config.sample_every_steps = 2
  config.checkpoint_every_steps = 2
  config.num_sample_sources = NUM_SAMPLE_SOURCES
  config.samples_per_source = SAMPLES_PER_SOURCE
  return config


def shared_root(tmp_path_factory) -> pathlib.Path:
  """Return the session's folder for the flower links, the decoded-image cache and workdirs."""
  return tmp_path_factory.getbasetemp() / 'tiny_runs'


def shared_config(tmp_path_factory, flowers_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """Return tiny_config on the session's linked flower folder (created on first use)."""
  root = shared_root(tmp_path_factory)
  image_dir = root / 'flowers'
  if not image_dir.exists():
    link_flowers(flowers_dir, image_dir)
  return tiny_config(image_dir, root / 'data_cache')


def trained_workdir(tmp_path_factory, flowers_dir: pathlib.Path) -> pathlib.Path:
  """Return a workdir trained with shared_config through both stages (once per session).

  Tests must not change it; copy it (or parts of it) to resume or break it.
  """
  root = shared_root(tmp_path_factory)
  key = str(root)
  if key not in _trained_workdirs:
    workdir = root / 'trained'
    shutil.rmtree(workdir, ignore_errors=True)  # Left over from a run that failed midway.
    train.train_and_evaluate(shared_config(tmp_path_factory, flowers_dir), str(workdir))
    _trained_workdirs[key] = workdir
  return _trained_workdirs[key]

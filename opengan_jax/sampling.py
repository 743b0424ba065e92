"""Restore G and F from a trained workdir and generate images from source image files."""

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from opengan_jax import (
  checkpointing,
  config_checks,
  gan,
  image_grid,
  networks,
  train,
  train_extractor,
)
from opengan_jax.data import decode

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """Read the config a workdir was trained with."""
  path = pathlib.Path(workdir) / checkpointing.CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f'{path} not found: {workdir} is not a training workdir. Train first with '
      f'`python main.py --config=... --workdir={workdir}`.'
    )
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_generator(
  config: ml_collections.ConfigDict, workdir: str, num_classes: int
) -> tuple[Any, dict[str, Any], int]:
  """Return (G, its variables, step) from the newest GAN checkpoint of `workdir`."""
  generator, discriminator = networks.make_networks(config, num_classes)
  target = checkpointing.on_first_device(
    jax.eval_shape(lambda: train.initial_gan_state(config, generator, discriminator))
  )
  manager = checkpointing.make_manager(workdir, train.STAGE, config.keep_checkpoints)
  if manager.latest_step() is None:
    raise FileNotFoundError(
      f'no GAN checkpoint in {manager.directory}; train the workdir first, or check --workdir.'
    )
  state, step = checkpointing.restore_latest(manager, target)
  return generator, jax.device_get(state.generator.variables()), step


def expand_sources(sources: list[str]) -> list[pathlib.Path]:
  """Turn files and folders into a sorted list of image files; raise on anything missing."""
  paths = []
  for source in sources:
    path = pathlib.Path(source)
    if path.is_dir():
      found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
      if not found:
        raise ValueError(
          f'source folder {path} contains no image files ({", ".join(IMAGE_SUFFIXES)}).'
        )
      paths.extend(found)
    elif path.is_file():
      paths.append(path)
    else:
      raise FileNotFoundError(f'source {path} does not exist; pass image files or folders.')
  if not paths:
    raise ValueError('no source images given; pass --sources=IMAGE[,IMAGE...].')
  return paths


def _load_source(path: pathlib.Path, resolution: int) -> np.ndarray:
  try:
    return decode.load_image(str(path), resolution)
  except decode.DECODE_ERRORS as error:
    raise ValueError(
      f'source {path} is not a readable image ({error}); pass JPEG, PNG or other image files.'
    ) from error


def sample_from_workdir(
  workdir: str,
  sources: list[str],
  output: str | None = None,
  num_samples: int = 8,
  seed: int = 0,
) -> pathlib.Path:
  """Generate `num_samples` images per source image and write them as one PNG grid.

  Each row contains the source image (resized and centre-cropped to the GAN resolution) followed by
  its samples. Returns the path of the PNG. Nothing is written when an input is invalid.
  """
  config = load_workdir_config(workdir)
  if config.model.conditioning != 'feature':
    raise ValueError(
      f'{workdir} was trained with model.conditioning={config.model.conditioning!r}; sampling '
      "from source images needs a feature-conditional ('feature') workdir."
    )
  if num_samples < 1:
    raise ValueError(f'num_samples={num_samples} must be at least 1.')
  paths = expand_sources(sources)
  images = np.stack([_load_source(p, config.resolution) for p in paths])
  images = images.astype(np.float32) / 127.5 - 1.0

  extractor, extractor_variables = train_extractor.restore_extractor(config, workdir)
  generator, g_variables, step = restore_generator(
    config, workdir, config.dataset.num_train_classes
  )
  logging.info(
    'Sampling %d images for each of %d sources at GAN step %d.', num_samples, len(paths), step
  )

  image_size = config_checks.extractor_image_size(config)
  features = np.asarray(gan.extract_features(extractor, extractor_variables, images, image_size))
  z = jax.random.normal(jax.random.PRNGKey(seed), (num_samples, config.model.z_dim))
  generate = gan.make_generate_fn(generator)
  rows = []
  for feature in features:
    cond = np.repeat(feature[None], num_samples, axis=0)
    rows.append(np.asarray(generate(g_variables, z, cond)))
  grid = image_grid.source_sample_grid(images, np.stack(rows))
  output_path = (
    pathlib.Path(output) if output else pathlib.Path(workdir) / 'samples' / 'sampled.png'
  )
  return image_grid.save_png(grid, output_path)

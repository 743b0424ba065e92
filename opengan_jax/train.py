"""The main job: stage 1 (metric extractor F), then stage 2 (the feature-conditional GAN).

`train_and_evaluate(config, workdir)` validates the config, loads the data, trains or restores F,
then trains G and D from the last GAN checkpoint in the workdir. Rerunning the same command
resumes. A killed run continues exactly as an uninterrupted one would, because the batch, the
latents and every other random draw are functions of the seed and the step.
"""

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from opengan_jax import (
  checkpointing,
  config_checks,
  gan,
  image_grid,
  input_pipeline,
  networks,
  parallel,
  train_extractor,
)
from opengan_jax.evaluation import protocols
from opengan_jax.models import Discriminator, Generator

STAGE = 'gan'
SAMPLER_STREAM = 2  # Keeps the GAN's data order apart from the extractor's for the same seed.
SAMPLE_STREAM = 3  # Seeds the fixed latents of the sample grids.


def initial_gan_state(
  config: ml_collections.ConfigDict, generator: Generator, discriminator: Discriminator
) -> gan.GanState:
  """Initialise G, D and their Adam states from the seed."""
  g_tx, d_tx = optimizers(config)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), SAMPLER_STREAM)
  return gan.create_gan_state(
    rng,
    generator,
    discriminator,
    g_tx,
    d_tx,
    resolution=config.resolution,
    z_dim=config.model.z_dim,
    conditioning=config.model.conditioning,
    feature_dim=config.extractor.feature_dim,
  )


def optimizers(config: ml_collections.ConfigDict):
  """Return the Adam optimisers of G and D."""
  g_tx = gan.make_optimizer(config.gan.g_learning_rate, config.gan.b1, config.gan.b2)
  d_tx = gan.make_optimizer(config.gan.d_learning_rate, config.gan.b1, config.gan.b2)
  return g_tx, d_tx


class SampleGrids:
  """Fixed source images and latents for the sample sheets written during training."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    split: input_pipeline.ClassSplit,
    generator: Generator,
    extractor,
    extractor_variables: dict[str, Any],
  ):
    self.config = config
    self.generate = gan.make_generate_fn(generator)
    self.sources = {}
    for name, images, labels in (
      ('train', split.train_images, split.train_labels),
      ('novel', split.novel_images, split.novel_labels),
    ):
      num = min(config.num_sample_sources, len(images))
      if num > 0:
        chosen = input_pipeline.sample_sources(images, labels, num, config.seed)
        self.sources[name] = (chosen['image'], chosen['label'])
    image_size = config_checks.extractor_image_size(config)
    self.conditions = {}
    for name, (images, labels) in self.sources.items():
      if config.model.conditioning == 'feature':
        cond = gan.extract_features(extractor, extractor_variables, images, image_size)
      elif config.model.conditioning == 'class':
        cond = labels if name == 'train' else None  # C-SAGAN has no embedding for novel classes.
      else:
        cond = np.zeros((images.shape[0],), np.int32)
      self.conditions[name] = cond
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), SAMPLE_STREAM)
    self.latents = jax.random.normal(key, (config.samples_per_source, config.model.z_dim))

  def write(self, state: gan.GanState, step: int, workdir: str, writer) -> None:
    """Generate every grid with the current G and write it to TensorBoard and as PNG."""
    variables = jax.device_get(state.generator.variables())
    k = self.config.samples_per_source
    images = {}
    for name, (sources, _) in self.sources.items():
      cond = self.conditions[name]
      if cond is None or sources.shape[0] == 0:
        continue
      s = sources.shape[0]
      z = np.tile(np.asarray(self.latents), (s, 1))
      cond = np.repeat(np.asarray(cond), k, axis=0)
      samples = np.asarray(self.generate(variables, z, cond))
      samples = samples.reshape((s, k) + samples.shape[1:])
      grid = image_grid.source_sample_grid(sources, samples)
      image_grid.save_png(grid, pathlib.Path(workdir) / 'samples' / f'{name}_{step:07d}.png')
      images[f'samples/{name}'] = grid[None]
    if images:
      writer.write_images(step, images)


def train_gan(
  config: ml_collections.ConfigDict,
  workdir: str,
  split: input_pipeline.ClassSplit,
  mesh: jax.sharding.Mesh,
  writer: metric_writers.MetricWriter,
  extractor,
  extractor_variables: dict[str, Any],
) -> gan.GanState:
  """Run stage 2 from the last checkpoint up to config.gan.num_steps."""
  num_classes = len(split.train_class_names)
  generator, discriminator = networks.make_networks(config, num_classes)
  state = parallel.replicate(initial_gan_state(config, generator, discriminator), mesh)
  manager = checkpointing.make_manager(workdir, STAGE, config.keep_checkpoints)
  state, start_step = checkpointing.restore_latest(manager, state)
  start_step = start_step or 0
  total_steps = config.gan.num_steps

  sampler = input_pipeline.BatchSampler(
    split.train_images,
    split.train_labels,
    global_batch_size=config.batch_size,
    seed=config.seed * 2 + SAMPLER_STREAM,
    random_flip=config.dataset.random_flip,
  )
  g_tx, d_tx = optimizers(config)
  train_step = gan.make_train_step(
    mesh,
    generator=generator,
    discriminator=discriminator,
    # F computes the real features and the G step's pass in the same dtype as G and D.
    extractor=None if extractor is None else extractor.clone(dtype=networks.compute_dtype(config)),
    g_tx=g_tx,
    d_tx=d_tx,
    conditioning=config.model.conditioning,
    z_dim=config.model.z_dim,
    feature_loss_weight=config.gan.feature_loss_weight,
    extractor_image_size=config_checks.extractor_image_size(config),
  )
  device_extractor_variables = parallel.replicate(extractor_variables, mesh)
  grids = SampleGrids(config, split, generator, extractor, extractor_variables)
  evaluation = None
  if config.eval_every_steps:
    evaluation = protocols.TrainingEvaluation(
      config, split, generator, extractor, extractor_variables
    )
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  if start_step >= total_steps:
    logging.info('GAN stage already at step %d of %d; nothing to train.', start_step, total_steps)
    return state

  logging.info('Training the GAN from step %d to %d.', start_step, total_steps)
  # An error or interrupt must not leave a save half-written: wait for it before leaving.
  try:
    for step in range(start_step, total_steps):
      batch = parallel.global_batch(sampler.batch(step), mesh)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = train_step(state, batch, device_extractor_variables)
      done = step + 1
      progress(done)
      is_last = done == total_steps
      if done % config.log_every_steps == 0 or is_last:
        writer.write_scalars(done, _finite_metrics(metrics, done, manager))
      if done % config.sample_every_steps == 0 or is_last:
        grids.write(state, done, workdir, writer)
      if evaluation is not None and done % config.eval_every_steps == 0:
        evaluation.run(state, done, workdir, writer)
      if done % config.checkpoint_every_steps == 0 or is_last:
        _finite_metrics(metrics, done, manager)
        checkpointing.save(manager, done, state)
  finally:
    manager.wait_until_finished()
  writer.flush()
  return state


def _finite_metrics(metrics, step: int, manager) -> dict[str, float]:
  values = {key: float(value) for key, value in jax.device_get(metrics).items()}
  bad = {key: value for key, value in values.items() if not np.isfinite(value)}
  if bad:
    raise FloatingPointError(
      f'non-finite GAN metrics at step {step}: {bad}. The last good checkpoint in '
      f'{manager.directory} is kept; lower the learning rates or change the seed and rerun.'
    )
  return values


def load_data(config: ml_collections.ConfigDict, workdir: str, resolution: int):
  """Load (or read from the cache) the class split at `resolution` pixels."""
  cache_dir = config.dataset.cache_dir or str(pathlib.Path(workdir) / 'data_cache')
  return input_pipeline.load_class_split(config.dataset, resolution, cache_dir)


def _start_run(config: ml_collections.ConfigDict, workdir: str):
  """Validate the config, guard the workdir and return the device mesh and a metric writer."""
  mesh = parallel.make_mesh()
  config_checks.validate_config(config, num_devices=mesh.devices.size)
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  checkpointing.check_workdir_config(workdir, config)
  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0, asynchronous=False
  )
  logging.info('Devices: %s; processes: %d.', mesh.devices.size, jax.process_count())
  return mesh, writer


def train_extractor_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run stage 1 alone in `workdir` (resuming if checkpointed) and return F's variables.

  The extractor is trained whatever model.conditioning is; a later full run in the same workdir
  reuses it. Its recall@1 is written to WORKDIR/extractor_recall.json.
  """
  mesh, writer = _start_run(config, workdir)
  split = load_data(config, workdir, config_checks.extractor_image_size(config))
  _, variables = train_extractor.train_or_restore_extractor(config, workdir, split, mesh, writer)
  writer.close()
  return variables


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> gan.GanState:
  """Train F (stage 1, skipped when finished) and the GAN (stage 2) in `workdir`."""
  mesh, writer = _start_run(config, workdir)

  split = load_data(config, workdir, config.resolution)
  image_size = config_checks.extractor_image_size(config)
  extractor_split = (
    split if image_size == config.resolution else load_data(config, workdir, image_size)
  )

  extractor, extractor_variables = None, None
  if config.model.conditioning == 'feature':
    extractor, extractor_variables = train_extractor.train_or_restore_extractor(
      config, workdir, extractor_split, mesh, writer
    )
  else:
    logging.info('conditioning=%r needs no extractor; skipping stage 1.', config.model.conditioning)

  state = train_gan(config, workdir, split, mesh, writer, extractor, extractor_variables)
  summary = {'gan_step': int(jax.device_get(state.step))}
  _write_json(pathlib.Path(workdir) / 'summary.json', summary)
  writer.close()
  return state


def _write_json(path: pathlib.Path, payload: dict) -> None:
  if jax.process_index() != 0:
    return
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
  tmp.replace(path)

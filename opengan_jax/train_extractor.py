"""Stage 1 loop: train the metric extractor F with the NCA loss, or restore a finished one.

The cached kernel centres are the eval-mode features of every training image, recomputed every
`extractor.cache_refresh_epochs` epochs. They are saved with the extractor's checkpoint, so a
resumed run uses exactly the centres an uninterrupted run would.
"""

import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from opengan_jax import (
  checkpointing,
  config_checks,
  efficientnet_weights,
  metric_learning,
  networks,
  parallel,
  pretrained,
)
from opengan_jax.input_pipeline import BatchSampler, ClassSplit

STAGE = 'extractor'
SAMPLER_STREAM = 1  # Keeps the extractor's data order apart from the GAN's for the same seed.

CALIBRATION_BATCHES = 30  # Leaves 0.9**30 (4%) of the initial statistics at momentum 0.9.


def calibrate_batch_norm(
  model: nn.Module, state: Any, sampler: BatchSampler, num_batches: int = CALIBRATION_BATCHES
) -> Any:
  """Set F's BatchNorm running statistics from training batches, without changing its weights.

  A network trained from scratch starts with running statistics (mean 0, variance 1) far from
  its batch statistics. The first cache of centres is computed in evaluation mode, so without
  calibration it would not match the training-mode features that the NCA loss compares with it.
  Statistics are updated even when the model's BatchNorm is frozen for training.
  """
  model = model.clone(freeze_batch_norm=False)

  @jax.jit
  def update(batch_stats, images):
    _, mutated = model.apply(
      {'params': state.params, 'batch_stats': batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    return mutated['batch_stats']

  batch_stats = state.batch_stats
  for step in range(num_batches):
    batch_stats = update(batch_stats, sampler.batch(step)['image'])
  logging.info('Calibrated the extractor BatchNorm statistics on %d batches.', num_batches)
  return state.replace(batch_stats=batch_stats)


def log_recall(
  model: nn.Module,
  variables: dict[str, Any],
  split: ClassSplit,
  train_features: np.ndarray,
  config: ml_collections.ConfigDict,
  writer: metric_writers.MetricWriter,
  step: int,
  workdir: str,
) -> dict[str, float]:
  """Write leave-one-out recall@1 on training and novel classes, and return both.

  The latest values also go to WORKDIR/extractor_recall.json.
  """
  novel_features = metric_learning.compute_features(
    model, variables, split.novel_images, config.extractor.eval_batch_size
  )
  recall = {
    'extractor/recall_at_1_train': metric_learning.recall_at_1(train_features, split.train_labels),
    'extractor/recall_at_1_novel': metric_learning.recall_at_1(novel_features, split.novel_labels),
  }
  writer.write_scalars(step, recall)
  logging.info(
    'Extractor step %d: recall@1 train %.4f, novel %.4f.',
    step,
    recall['extractor/recall_at_1_train'],
    recall['extractor/recall_at_1_novel'],
  )
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / 'extractor_recall.json'
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps({'step': step, **recall}, indent=2))
    tmp.replace(path)
  return recall


def train_or_restore_extractor(
  config: ml_collections.ConfigDict,
  workdir: str,
  split: ClassSplit,
  mesh: jax.sharding.Mesh,
  writer: metric_writers.MetricWriter,
) -> tuple[nn.Module, dict[str, Any]]:
  """Run stage 1 to its last epoch (resuming if checkpointed) and return F and its variables.

  With num_epochs=0, F keeps its initial (for example pretrained) weights; its recall@1 is still
  measured and written to WORKDIR/extractor_recall.json.
  """
  model = networks.make_extractor(config)
  cfg = config.extractor
  image_size = config_checks.extractor_image_size(config)
  sampler = BatchSampler(
    split.train_images,
    split.train_labels,
    global_batch_size=cfg.batch_size,
    seed=config.seed * 2 + SAMPLER_STREAM,
    random_flip=config.dataset.random_flip,
  )
  steps_per_epoch = sampler.steps_per_epoch
  total_steps = cfg.num_epochs * steps_per_epoch

  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), SAMPLER_STREAM)
  state = metric_learning.create_extractor_state(model, rng, (1, image_size, image_size, 3), cfg)
  num_train = split.train_images.shape[0]
  target = {
    'state': state,
    'centres': np.zeros((num_train, cfg.feature_dim), np.float32),
  }
  manager = checkpointing.make_manager(workdir, STAGE, config.keep_checkpoints)
  restored, start_step = checkpointing.restore_latest(manager, target)
  state, centres = restored['state'], np.asarray(restored['centres'])
  start_step = start_step or 0
  variant = config_checks.extractor_variant(config)
  if start_step == 0 and cfg.init_weights is not None:
    state = pretrained.init_state_from_file(state, cfg.init_weights)
    logging.info('Initialised the extractor from %s.', cfg.init_weights)
  elif start_step == 0 and variant is not None and cfg.pretrained:
    state = efficientnet_weights.init_state_from_package(state, variant)
    logging.info('Initialised the extractor from the ImageNet EfficientNet-%s weights.', variant)
  logging.info(
    'Extractor %s: %d-d embeddings from %d px inputs, BatchNorm %s.',
    cfg.arch,
    cfg.feature_dim,
    image_size,
    'frozen' if config_checks.extractor_freeze_batch_norm(config) else 'trained',
  )

  if start_step >= total_steps:
    if manager.latest_step() is None:
      # num_epochs=0 trains nothing. Record the recall of the initial F, and save it with its
      # features as centres so that sampling can restore it later.
      variables = _variables(state)
      centres = metric_learning.compute_features(
        model, variables, split.train_images, cfg.eval_batch_size
      )
      log_recall(model, variables, split, centres, config, writer, 0, workdir)
      checkpointing.save(manager, 0, {'state': state, 'centres': centres})
      manager.wait_until_finished()
    logging.info('Extractor stage finished at step %d; reusing it.', start_step)
    return model, _variables(state)

  logging.info(
    'Training the extractor: %d epochs of %d steps, from step %d.',
    cfg.num_epochs,
    steps_per_epoch,
    start_step,
  )
  if start_step == 0 and not config_checks.extractor_is_pretrained(config):
    state = calibrate_batch_norm(model, state, sampler)
  train_step = metric_learning.make_extractor_train_step(model, mesh, cfg.sigma, cfg.top_k)
  state = parallel.replicate(state, mesh)
  centre_labels = parallel.replicate(np.asarray(split.train_labels, np.int32), mesh)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  refresh_every = cfg.cache_refresh_epochs * steps_per_epoch
  save_every = cfg.checkpoint_every_epochs * steps_per_epoch
  device_centres = parallel.replicate(centres, mesh)

  # An error or interrupt must not leave a save half-written: wait for it before leaving.
  try:
    for step in range(start_step, total_steps):
      if step % refresh_every == 0:
        variables = _variables(state)
        centres = metric_learning.compute_features(
          model, variables, split.train_images, cfg.eval_batch_size
        )
        device_centres = parallel.replicate(centres, mesh)
        log_recall(model, variables, split, centres, config, writer, step, workdir)

      batch = parallel.global_batch(sampler.batch(step), mesh)
      state, metrics = train_step(state, batch, device_centres, centre_labels)
      done = step + 1
      progress(done)
      if done % 50 == 0 or done == total_steps:
        writer.write_scalars(done, {f'extractor/{k}': float(v) for k, v in metrics.items()})
      if done % save_every == 0 or done == total_steps:
        loss = float(metrics['loss'])
        if not np.isfinite(loss):
          raise FloatingPointError(
            f'extractor loss is {loss} at step {done}; the last good checkpoint in '
            f'{manager.directory} is kept. Lower --config.extractor.learning_rate and rerun.'
          )
        checkpointing.save(manager, done, {'state': state, 'centres': centres})
  finally:
    manager.wait_until_finished()
  variables = _variables(state)
  final = metric_learning.compute_features(
    model, variables, split.train_images, cfg.eval_batch_size
  )
  log_recall(model, variables, split, final, config, writer, total_steps, workdir)
  return model, variables


def _variables(state: Any) -> dict[str, Any]:
  return {'params': state.params, 'batch_stats': state.batch_stats}


def restore_extractor(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[nn.Module, dict[str, Any]]:
  """Return F and its variables from the newest extractor checkpoint of `workdir`."""
  model = networks.make_extractor(config)
  # Restored as saved (nested dicts of arrays): only F's variables are needed here, not the
  # optimiser state or the centres, whose shape depends on the training images.
  restored, step = checkpointing.restore_latest_as_saved(workdir, STAGE)
  if step is None:
    directory = pathlib.Path(workdir).absolute() / 'checkpoints' / STAGE
    raise FileNotFoundError(
      f'no extractor checkpoint in {directory}; train the workdir first, or check --workdir.'
    )
  state = restored['state']
  return model, {'params': state['params'], 'batch_stats': state['batch_stats']}

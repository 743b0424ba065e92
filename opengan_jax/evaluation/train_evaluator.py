"""Train the evaluator network on every class of a dataset, at the GAN resolution.

  python -m opengan_jax.evaluation.train_evaluator --config=configs/flowers.py \
    --workdir=/tmp/evaluator32 --config.dataset.source=folder \
    --config.dataset.image_dir=../shared/data/flowers102 --config.resolution=32

The training and novel classes of the config's dataset are joined into one classification task
(training classes first, then novel classes, in the dataset's order). A fixed fraction of each
class (config.evaluator.held_out_fraction, drawn from config.seed) is held out, and the accuracy
on it is logged and written to WORKDIR/evaluator.json. Rerunning the command resumes from the last
epoch checkpoint.
"""

import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax.training import train_state
from jax import lax
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from opengan_jax import checkpointing, input_pipeline, parallel
from opengan_jax.evaluation import evaluator as evaluator_lib

SAMPLER_STREAM = 4  # Keeps the evaluator's data order apart from the other stages' for one seed.


class EvaluatorState(train_state.TrainState):
  """Train state of the evaluator: params, optimiser state and BatchNorm statistics."""

  batch_stats: Any


def held_out_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Split row indices into (training rows, held-out rows), class by class.

  Each class with at least 2 images holds out round(fraction * count) of them, at least 1 and at
  most count - 1, drawn by np.random.default_rng([seed, label]). Classes with 1 image keep it
  for training.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'held_out_fraction={fraction} must be in [0, 1).')
  labels = np.asarray(labels)
  train_rows, held_rows = [], []
  for label in np.unique(labels):
    rows = np.flatnonzero(labels == label)
    rows = rows[np.random.default_rng([seed, int(label)]).permutation(len(rows))]
    count = len(rows)
    num_held = 0
    if fraction > 0 and count >= 2:
      num_held = min(max(int(round(fraction * count)), 1), count - 1)
    held_rows.append(rows[:num_held])
    train_rows.append(rows[num_held:])
  return np.sort(np.concatenate(train_rows)), np.sort(np.concatenate(held_rows))


def load_all_classes(
  config: ml_collections.ConfigDict, eval_dir: str
) -> tuple[np.ndarray, np.ndarray, list[str], int]:
  """Load every class of the dataset at config.resolution.

  Returns uint8 images, int32 labels, class names and the number of training classes. Training
  classes keep their labels and novel class c becomes num_train_classes + c.
  """
  cache_dir = config.dataset.cache_dir or str(pathlib.Path(eval_dir) / 'data_cache')
  split = input_pipeline.load_class_split(config.dataset, int(config.resolution), cache_dir)
  num_train = len(split.train_class_names)
  images = np.concatenate([split.train_images, split.novel_images])
  labels = np.concatenate([split.train_labels, split.novel_labels + num_train]).astype(np.int32)
  names = list(split.train_class_names) + list(split.novel_class_names)
  return images, labels, names, num_train


def train_step_per_device(
  state: EvaluatorState, batch: dict[str, jax.Array], *, network: evaluator_lib.EvaluatorNet
) -> tuple[EvaluatorState, dict[str, jax.Array]]:
  """Run one cross-entropy update on this device's share of the batch (inside shard_map)."""
  axis = network.axis_name

  def loss_fn(params):
    (_, logits), mutated = network.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, (logits, mutated['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # Every device has the same number of rows, so the mean of per-device means is the global mean.
  grads = lax.pmean(grads, axis)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == batch['label'])
  return state, lax.pmean({'loss': loss, 'accuracy': accuracy}, axis)


def make_train_step(network: evaluator_lib.EvaluatorNet, mesh: jax.sharding.Mesh):
  """Return the jitted data-parallel `(state, global batch) -> (state, metrics)`."""
  per_device = jax.shard_map(
    lambda state, batch: train_step_per_device(
      state, batch, network=network.clone(axis_name=parallel.DATA_AXIS)
    ),
    mesh=mesh,
    in_specs=(P(), P(parallel.DATA_AXIS)),
    out_specs=(P(), P()),
    check_vma=False,
  )
  return jax.jit(per_device, donate_argnums=0)


def create_state(
  network: evaluator_lib.EvaluatorNet, config: ml_collections.ConfigDict, total_steps: int
) -> EvaluatorState:
  """Initialise the network and AdamW with a cosine-decayed learning rate."""
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), SAMPLER_STREAM)
  images = jnp.zeros((1, config.resolution, config.resolution, 3), jnp.float32)
  variables = network.init(rng, images, train=False)
  schedule = optax.cosine_decay_schedule(config.evaluator.learning_rate, max(total_steps, 1))
  tx = optax.adamw(schedule, weight_decay=config.evaluator.weight_decay)
  return EvaluatorState.create(
    apply_fn=network.apply,
    params=variables['params'],
    tx=tx,
    batch_stats=variables['batch_stats'],
  )


def accuracy(
  network: evaluator_lib.EvaluatorNet,
  variables: Any,
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  mesh: jax.sharding.Mesh,
) -> float | None:
  """Return the evaluation-mode top-1 accuracy on uint8 images (None when there are none)."""
  if len(images) == 0:
    return None
  _, logits = evaluator_lib.run_batched(
    evaluator_lib.make_apply_fn(network),
    variables,
    [images],
    batch_size,
    mesh,
    evaluator_lib.to_float_images,
  )
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def _check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  cfg = config.evaluator
  for field in ('num_epochs', 'batch_size', 'eval_batch_size'):
    value = cfg[field]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'invalid config.evaluator.{field}={value!r}: it must be an integer >= 1.')
  parallel.check_batch_divisible(cfg.batch_size, mesh, 'evaluator.batch_size')
  if not cfg.widths or any(int(w) < 1 for w in cfg.widths):
    raise ValueError(f'invalid config.evaluator.widths={cfg.widths!r}: use positive channels.')


def train_evaluator(config: ml_collections.ConfigDict, eval_dir: str) -> dict[str, Any]:
  """Train (or resume) the evaluator in `eval_dir`; return the contents of evaluator.json."""
  mesh = parallel.make_mesh()
  _check_config(config, mesh)
  cfg = config.evaluator
  pathlib.Path(eval_dir).mkdir(parents=True, exist_ok=True)
  images, labels, class_names, num_train_classes = load_all_classes(config, eval_dir)
  train_rows, held_rows = held_out_split(labels, cfg.held_out_fraction, config.seed)
  sampler = input_pipeline.BatchSampler(
    images[train_rows],
    labels[train_rows],
    global_batch_size=cfg.batch_size,
    seed=config.seed * 2 + SAMPLER_STREAM,
    random_flip=True,
  )
  total_steps = cfg.num_epochs * sampler.steps_per_epoch
  network = evaluator_lib.EvaluatorNet(num_classes=len(class_names), widths=tuple(cfg.widths))
  state = parallel.replicate(create_state(network, config, total_steps), mesh)
  manager = checkpointing.make_manager(eval_dir, evaluator_lib.STAGE, max_to_keep=1)
  state, start_step = checkpointing.restore_latest(manager, state)
  start_step = start_step or 0
  logging.info(
    'Training the evaluator on %d classes at %d px: %d training and %d held-out images, '
    'steps %d to %d (%d per epoch).',
    len(class_names),
    config.resolution,
    len(train_rows),
    len(held_rows),
    start_step,
    total_steps,
    sampler.steps_per_epoch,
  )
  train_step = make_train_step(network, mesh)
  start_time = time.perf_counter()
  try:
    for step in range(start_step, total_steps):
      batch = parallel.global_batch(sampler.batch(step), mesh)
      state, metrics = train_step(state, {'image': batch['image'], 'label': batch['label']})
      done = step + 1
      if done % sampler.steps_per_epoch == 0 or done == total_steps:
        metrics = {key: float(value) for key, value in jax.device_get(metrics).items()}
        if not np.isfinite(metrics['loss']):
          raise FloatingPointError(
            f'evaluator loss is {metrics["loss"]} at step {done}; lower '
            '--config.evaluator.learning_rate and rerun.'
          )
        logging.info(
          'Evaluator step %d of %d: batch loss %.4f, batch accuracy %.3f, %.0f s.',
          done,
          total_steps,
          metrics['loss'],
          metrics['accuracy'],
          time.perf_counter() - start_time,
        )
        checkpointing.save(manager, done, state)
  finally:
    manager.wait_until_finished()

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  batch_size = cfg.eval_batch_size
  info = {
    'resolution': int(config.resolution),
    'feature_dim': int(cfg.widths[-1]),
    'feature_space': evaluator_lib.feature_space_name(int(config.resolution), int(cfg.widths[-1])),
    'widths': [int(w) for w in cfg.widths],
    'class_names': class_names,
    'num_train_classes': num_train_classes,
    'held_out_fraction': float(cfg.held_out_fraction),
    'held_out_accuracy': accuracy(
      network, variables, images[held_rows], labels[held_rows], batch_size, mesh
    ),
    'train_accuracy': accuracy(
      network, variables, images[train_rows], labels[train_rows], batch_size, mesh
    ),
    'num_train_images': len(train_rows),
    'num_held_out_images': len(held_rows),
    'steps': int(total_steps),
    'epochs': int(cfg.num_epochs),
    'seed': int(config.seed),
    'dataset': {
      'source': config.dataset.source,
      'name': config.dataset.name,
      'image_dir': config.dataset.image_dir,
    },
  }
  logging.info(
    'Evaluator (%s): held-out accuracy %s on %d images, training accuracy %.4f.',
    info['feature_space'],
    info['held_out_accuracy'],
    len(held_rows),
    info['train_accuracy'],
  )
  if jax.process_index() == 0:
    path = pathlib.Path(eval_dir) / evaluator_lib.INFO_FILE
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)
  return info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flags_values = flags.FLAGS
  train_evaluator(flags_values.config, flags_values.workdir)


if __name__ == '__main__':
  from opengan_jax import cpu_backend

  cpu_backend.add_xla_cpu_flags()  # Before JAX starts its backend.
  # Flags are defined only when run as a command, so importing this module defines none.
  flags.DEFINE_string('workdir', None, 'Evaluator directory (EVAL_DIR): checkpoint and JSON.')
  config_flags.DEFINE_config_file('config', None, 'Dataset configuration file.', lock_config=True)
  flags.mark_flags_as_required(['workdir', 'config'])
  jax.config.config_with_absl()
  app.run(main)

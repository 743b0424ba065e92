"""Orbax checkpoints of both stages and the config guard of a workdir.

Layout of a workdir:
  config.json             the config the workdir was created with
  checkpoints/extractor/  stage 1 (F) checkpoints, one folder per saved step
  checkpoints/gan/        stage 2 (G, D, optimisers, statistics, step, rng) checkpoints

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed
while saving keeps its previous checkpoint.
"""

import json
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = 'config.json'

# Config fields that change the shape or meaning of what a workdir holds. A workdir cannot be
# resumed with other values for them; every other field (steps, logging, learning rates) may change.
ARCHITECTURE_FIELDS = (
  'resolution',
  'model.ch',
  'model.z_dim',
  'model.conditioning',
  'model.norm',
  'model.centred_scale',
  'extractor.arch',
  'extractor.stem',
  'extractor.image_size',
  'extractor.feature_dim',
  'extractor.projection_dim',
  'dataset.source',
  'dataset.name',
  'dataset.num_train_classes',
)


def _lookup(config: dict, dotted: str) -> Any:
  value = config
  for key in dotted.split('.'):
    if not isinstance(value, dict) or key not in value:
      return None
    value = value[key]
  return value


def check_workdir_config(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Write config.json on first use; on reuse, raise ValueError if an architecture field differs.

  The error names every differing field with both values, so the user can restore them or pick
  a new workdir.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  current = json.loads(config.to_json_best_effort())
  if not path.exists():
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix('.json.tmp')
      tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
      tmp.replace(path)
    return

  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(
      f'{path} is not valid JSON ({error}); restore it or use a new --workdir.'
    ) from error
  differences = [
    f'{field}: workdir has {_lookup(saved, field)!r}, config has {_lookup(current, field)!r}'
    for field in ARCHITECTURE_FIELDS
    if _lookup(saved, field) != _lookup(current, field)
  ]
  if differences:
    raise ValueError(
      f'workdir {workdir} was written with an incompatible config:\n  '
      + '\n  '.join(differences)
      + '\nUse a new --workdir, or set these fields back to the workdir values.'
    )


def make_manager(
  workdir: str | pathlib.Path, stage: str, max_to_keep: int
) -> ocp.CheckpointManager:
  """Open (or create) the checkpoint manager of one stage: 'extractor' or 'gan'."""
  directory = pathlib.Path(workdir).absolute() / 'checkpoints' / stage
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Save `state` at `step` (asynchronously; call manager.wait_until_finished() before exit)."""
  manager.save(step, args=ocp.args.StandardSave(state))
  logging.info('Saving checkpoint at step %d to %s.', step, manager.directory)


def on_first_device(tree: Any) -> Any:
  """Map a tree of arrays or shape structs to shape structs placed on the first local device.

  Used as a restore target, it lets a checkpoint written on any number of devices restore here:
  without an explicit sharding, orbax reuses the saved one, which fails when the count differs.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), tree
  )


def restore_latest_as_saved(workdir: str | pathlib.Path, stage: str) -> tuple[Any, int | None]:
  """Restore the newest checkpoint of `stage` as saved: nested dicts of arrays on one device.

  Unlike restore_latest, no target is needed, and the checkpoint may come from any number of
  devices: orbax's restore without a target reuses the saved shardings, which fails when the
  device count differs. Returns (tree, step), or (None, None) when the stage has no checkpoint.
  """
  directory = pathlib.Path(workdir).absolute() / 'checkpoints' / stage
  manager = ocp.CheckpointManager(
    directory,
    item_handlers=ocp.StandardCheckpointHandler(),
    options=ocp.CheckpointManagerOptions(read_only=True),
  )
  step = manager.latest_step()
  if step is None:
    return None, None
  abstract = on_first_device(manager.item_metadata(step))
  tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  logging.info('Restored checkpoint of step %d from %s.', step, directory)
  return tree, step


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int | None]:
  """Restore the newest checkpoint into the structure, shapes and shardings of `target`.

  Returns (state, step), or (target, None) when the manager has no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return target, None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  logging.info('Restored checkpoint of step %d from %s.', step, manager.directory)
  return state, step

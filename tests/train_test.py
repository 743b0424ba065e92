"""End-to-end tests of train.train_and_evaluate on real flower images.

Each test builds on the session's trained workdir (tiny_runs.trained_workdir) where it can,
because every call of train_and_evaluate that trains compiles the training steps anew.
"""

import json
import logging
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_runs
from PIL import Image

from opengan_jax import checkpointing, input_pipeline, metric_learning, train

GRID_PADDING = 2  # image_grid.make_grid's default padding in pixels.
NUM_TRAIN_IMAGES = tiny_runs.NUM_TRAIN_CLASSES * tiny_runs.IMAGES_PER_CLASS


@pytest.fixture
def trained(tmp_path_factory, flowers_dir) -> pathlib.Path:
  return tiny_runs.trained_workdir(tmp_path_factory, flowers_dir)


@pytest.fixture
def config(tmp_path_factory, flowers_dir):
  return tiny_runs.shared_config(tmp_path_factory, flowers_dir)


@pytest.fixture
def absl_info(caplog):
  caplog.set_level(logging.INFO, logger='absl')
  return caplog


def _steps(workdir: pathlib.Path, stage: str) -> list[int]:
  return list(checkpointing.make_manager(workdir, stage, max_to_keep=10).all_steps())


def _restore_raw(workdir: pathlib.Path, stage: str, step: int):
  """Return a checkpoint as the nested dicts of numpy arrays that orbax saved."""
  manager = checkpointing.make_manager(workdir, stage, max_to_keep=10)
  return manager.restore(step, args=ocp.args.StandardRestore())


def _read_scalars(workdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """Return {tag: {step: value}} from every TensorBoard events file in `workdir`."""
  import tensorflow as tf

  scalars: dict[str, dict[int, float]] = {}
  for path in sorted(workdir.glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.HasField('tensor') and not value.tensor.tensor_shape.dim:
          number = float(tf.make_ndarray(value.tensor))
        elif value.HasField('simple_value'):
          number = value.simple_value
        else:
          continue  # Images.
        scalars.setdefault(value.tag, {})[event.step] = number
  return scalars


def _grid_side(num_tiles: int) -> int:
  return num_tiles * (tiny_runs.RESOLUTION + GRID_PADDING) + GRID_PADDING


def _assert_trees_equal(actual, expected) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_folder_run_writes_checkpoints(trained):
  saved = json.loads((trained / 'config.json').read_text())
  assert saved['resolution'] == tiny_runs.RESOLUTION
  assert saved['model']['ch'] == 8

  extractor_steps = NUM_TRAIN_IMAGES // 16  # One epoch at extractor.batch_size=16.
  assert _steps(trained, 'extractor') == [extractor_steps]
  assert _steps(trained, 'gan') == [2, 4]
  summary = json.loads((trained / 'summary.json').read_text())
  assert summary == {'gan_step': tiny_runs.NUM_STEPS}

  recall = json.loads((trained / 'extractor_recall.json').read_text())
  assert recall['step'] == extractor_steps
  for key in ('extractor/recall_at_1_train', 'extractor/recall_at_1_novel'):
    assert 0.0 <= recall[key] <= 1.0, f'{key} is {recall[key]}'


@pytest.mark.parametrize('name', ['train', 'novel'])
def test_folder_run_writes_sample_grids(trained, name):
  expected_size = (
    _grid_side(1 + tiny_runs.SAMPLES_PER_SOURCE),  # Width: the source, then its samples.
    _grid_side(tiny_runs.NUM_SAMPLE_SOURCES),  # Height: one row per source image.
  )
  for step in (2, 4):
    path = trained / 'samples' / f'{name}_{step:07d}.png'
    assert path.is_file(), f'{path} is missing'
    with Image.open(path) as image:
      assert image.format == 'PNG'
      assert image.mode == 'RGB'
      assert image.size == expected_size


def test_folder_run_writes_tensorboard_scalars(trained):
  scalars = _read_scalars(trained)
  for tag in ('d_loss', 'g_loss', 'feature_loss'):
    assert tag in scalars, f'{tag} missing from {sorted(scalars)}'
    assert sorted(scalars[tag]) == [2, 4]
    assert all(np.isfinite(v) for v in scalars[tag].values())
  novel = scalars['extractor/recall_at_1_novel']
  assert sorted(novel) == [0, NUM_TRAIN_IMAGES // 16]
  assert all(0.0 <= v <= 1.0 for v in novel.values())


def test_tfds_image_folder_run(tmp_path, flowers_dir):
  image_dir = tmp_path / 'images'
  tiny_runs.link_flowers(flowers_dir, image_dir / 'train')
  config = tiny_runs.tiny_config(image_dir, tmp_path / 'cache')
  config.dataset.source = 'tfds_image_folder'
  config.gan.num_steps = 2
  workdir = tmp_path / 'workdir'

  state = train.train_and_evaluate(config, str(workdir))

  assert int(state.step) == 2
  assert _steps(workdir, 'extractor') == [2]
  assert _steps(workdir, 'gan') == [2]
  cached = [p.name for p in (tmp_path / 'cache').iterdir()]
  assert len(cached) == 1
  assert cached[0].startswith('tfds_image_folder-images-32px-')
  for name in ('train', 'novel'):
    assert (workdir / 'samples' / f'{name}_0000002.png').is_file()


def _fail_if_called(*args, **kwargs):
  raise AssertionError('the finished extractor stage was trained again')


def test_resume_matches_uninterrupted_run(trained, config, tmp_path, monkeypatch, absl_info):
  # The resumed workdir contains what the uninterrupted run had written after step 2: its config,
  # its finished stage 1 and its GAN checkpoint of step 2.
  resumed = tmp_path / 'resumed'
  resumed.mkdir()
  shutil.copy(trained / 'config.json', resumed)
  shutil.copytree(trained / 'checkpoints' / 'extractor', resumed / 'checkpoints' / 'extractor')
  shutil.copytree(trained / 'checkpoints' / 'gan' / '2', resumed / 'checkpoints' / 'gan' / '2')
  extractor_steps = _steps(trained, 'extractor')
  monkeypatch.setattr(metric_learning, 'make_extractor_train_step', _fail_if_called)

  train.train_and_evaluate(config, str(resumed))

  assert 'Extractor stage finished at step' in absl_info.text
  assert 'Restored checkpoint of step 2' in absl_info.text
  assert _steps(resumed, 'extractor') == extractor_steps
  assert _steps(resumed, 'gan') == [2, 4]
  _assert_trees_equal(_restore_raw(resumed, 'gan', 4), _restore_raw(trained, 'gan', 4))

  straight_scalars = _read_scalars(trained)
  resumed_scalars = _read_scalars(resumed)
  for tag in ('d_loss', 'd_real', 'd_fake', 'g_loss', 'feature_loss'):
    assert sorted(resumed_scalars[tag]) == [4], f'{tag} logged at {sorted(resumed_scalars[tag])}'
    assert resumed_scalars[tag][4] == straight_scalars[tag][4], tag


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('resolution', 64, 'resolution: workdir has 32, config has 64'),
    ('model.ch', 16, 'model.ch: workdir has 8, config has 16'),
  ],
)
def test_incompatible_workdir_rejected(trained, config, field, value, message):
  group, _, key = field.rpartition('.')
  (config[group] if group else config)[key] = value
  saved = (trained / 'config.json').read_text()

  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(trained))

  assert (trained / 'config.json').read_text() == saved
  assert _steps(trained, 'gan') == [2, 4]


def test_compatible_change_accepted(trained, config, tmp_path, absl_info):
  workdir = tmp_path / 'rerun'
  shutil.copytree(trained, workdir)
  config.gan.g_learning_rate = 3e-4
  config.log_every_steps = 3

  state = train.train_and_evaluate(config, str(workdir))

  assert int(state.step) == tiny_runs.NUM_STEPS
  assert 'nothing to train' in absl_info.text
  assert _steps(workdir, 'gan') == [2, 4]


def test_non_finite_loss_keeps_last_checkpoint(trained, config, tmp_path, monkeypatch):
  workdir = tmp_path / 'diverged'
  shutil.copytree(trained, workdir)
  batch_fn = input_pipeline.BatchSampler.batch

  def batch_with_nan(sampler, step):
    batch = batch_fn(sampler, step)
    if step == tiny_runs.NUM_STEPS + 1:  # The iteration that ends at step NUM_STEPS + 2.
      batch['image'][0, 0, 0, 0] = np.nan
    return batch

  monkeypatch.setattr(input_pipeline.BatchSampler, 'batch', batch_with_nan)
  config.gan.num_steps = tiny_runs.NUM_STEPS + 3
  config.checkpoint_every_steps = 1  # Saves step 5, then would save the diverged step 6.
  config.log_every_steps = 100
  config.sample_every_steps = 100

  with pytest.raises(FloatingPointError, match='non-finite GAN metrics at step 6'):
    train.train_and_evaluate(config, str(workdir))

  # The save of step 5 was still running when step 6 failed; it must be complete, not left as
  # a temporary folder.
  gan_dir = workdir / 'checkpoints' / 'gan'
  assert sorted(p.name for p in gan_dir.iterdir()) == ['2', '4', '5']
  assert _steps(workdir, 'gan') == [2, 4, 5]
  last_good = _restore_raw(workdir, 'gan', 5)
  assert int(last_good['step']) == 5
  for leaf in jax.tree.leaves(last_good):
    assert np.isfinite(leaf).all()


@pytest.mark.parametrize('conditioning', ['none', 'class'])
def test_baseline_run_trains_without_extractor(config, tmp_path, conditioning):
  # U-SAGAN ('none') and C-SAGAN ('class') skip stage 1 and train the GAN without F.
  config.model.conditioning = conditioning
  config.gan.num_steps = 2
  workdir = tmp_path / conditioning
  state = train.train_and_evaluate(config, str(workdir))
  assert int(jax.device_get(state.step)) == 2
  assert _steps(workdir, 'gan') == [2]
  assert not (workdir / 'checkpoints' / 'extractor').exists()
  for leaf in jax.tree.leaves(_restore_raw(workdir, 'gan', 2)):
    assert np.isfinite(leaf).all()

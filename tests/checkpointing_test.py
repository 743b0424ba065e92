"""Tests of the workdir config guard and the orbax checkpoint helpers."""

import json

import jax
import numpy as np
import pytest

from configs import default
from opengan_jax import checkpointing, parallel


def _config():
  config = default.get_config()
  config.resolution = 32
  config.model.ch = 8
  return config


def test_first_use_writes_config_json(tmp_path):
  workdir = tmp_path / 'new' / 'workdir'
  config = _config()

  checkpointing.check_workdir_config(workdir, config)

  saved = json.loads((workdir / 'config.json').read_text())
  assert saved == json.loads(config.to_json_best_effort())
  assert not list(workdir.glob('*.tmp'))


def test_same_config_accepted(tmp_path):
  checkpointing.check_workdir_config(tmp_path, _config())
  before = (tmp_path / 'config.json').read_text()

  checkpointing.check_workdir_config(tmp_path, _config())

  assert (tmp_path / 'config.json').read_text() == before


def test_training_fields_may_change(tmp_path):
  checkpointing.check_workdir_config(tmp_path, _config())
  before = (tmp_path / 'config.json').read_text()
  config = _config()
  config.gan.num_steps = 10
  config.gan.d_learning_rate = 3e-4
  config.batch_size = 16
  config.log_every_steps = 7

  checkpointing.check_workdir_config(tmp_path, config)

  assert (tmp_path / 'config.json').read_text() == before, 'the original config is kept'


@pytest.mark.parametrize(
  'group, key, value, message',
  [
    (None, 'resolution', 64, 'resolution: workdir has 32, config has 64'),
    ('model', 'ch', 16, 'model.ch: workdir has 8, config has 16'),
    (
      'model',
      'conditioning',
      'class',
      "model.conditioning: workdir has 'feature', config has 'class'",
    ),
    ('model', 'norm', 'instance', "model.norm: workdir has 'batch', config has 'instance'"),
    ('extractor', 'image_size', 64, 'extractor.image_size: workdir has None, config has 64'),
    ('dataset', 'num_train_classes', 5, 'dataset.num_train_classes: workdir has 82, config has 5'),
  ],
)
def test_architecture_change_rejected(tmp_path, group, key, value, message):
  checkpointing.check_workdir_config(tmp_path, _config())
  config = _config()
  (config[group] if group else config)[key] = value

  with pytest.raises(ValueError, match=message):
    checkpointing.check_workdir_config(tmp_path, config)


def test_every_differing_field_named(tmp_path):
  checkpointing.check_workdir_config(tmp_path, _config())
  config = _config()
  config.resolution = 64
  config.model.z_dim = 64

  with pytest.raises(ValueError) as raised:
    checkpointing.check_workdir_config(tmp_path, config)

  message = str(raised.value)
  assert str(tmp_path) in message
  assert 'resolution: workdir has 32, config has 64' in message
  assert 'model.z_dim: workdir has 128, config has 64' in message
  assert 'new --workdir' in message


def test_invalid_config_json_rejected(tmp_path):
  (tmp_path / 'config.json').write_text('{"resolution": 32,')
  with pytest.raises(ValueError, match='config.json is not valid JSON'):
    checkpointing.check_workdir_config(tmp_path, _config())


def test_restore_latest_without_checkpoint(tmp_path):
  manager = checkpointing.make_manager(tmp_path, 'gan', max_to_keep=2)
  target = {'w': np.zeros((3,), np.float32)}

  state, step = checkpointing.restore_latest(manager, target)

  assert step is None
  assert state is target
  assert (tmp_path / 'checkpoints' / 'gan').is_dir()


def test_save_and_restore_latest(tmp_path):
  manager = checkpointing.make_manager(tmp_path, 'gan', max_to_keep=2)
  for step in (1, 2, 3):
    tree = {'w': np.full((3,), step, np.float32), 'n': {'b': np.arange(step, dtype=np.int32)}}
    checkpointing.save(manager, step, jax.tree.map(jax.numpy.asarray, tree))
  manager.wait_until_finished()
  target = {'w': np.zeros((3,), np.float32), 'n': {'b': np.zeros((3,), np.int32)}}

  reopened = checkpointing.make_manager(tmp_path, 'gan', max_to_keep=2)
  state, step = checkpointing.restore_latest(reopened, jax.tree.map(jax.numpy.asarray, target))

  assert step == 3
  assert list(reopened.all_steps()) == [2, 3], 'max_to_keep=2 keeps the newest two'
  np.testing.assert_array_equal(state['w'], np.full((3,), 3, np.float32))
  np.testing.assert_array_equal(state['n']['b'], np.arange(3, dtype=np.int32))
  assert state['n']['b'].dtype == np.int32


def test_restore_as_saved_without_target(tmp_path):
  mesh = parallel.make_mesh()
  tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'n': {'s': np.int32(3)}}
  manager = checkpointing.make_manager(tmp_path, 'extractor', max_to_keep=2)
  checkpointing.save(manager, 7, parallel.replicate(tree, mesh))
  manager.wait_until_finished()

  restored, step = checkpointing.restore_latest_as_saved(tmp_path, 'extractor')

  assert step == 7
  np.testing.assert_array_equal(restored['w'], tree['w'])
  np.testing.assert_array_equal(restored['n']['s'], 3)
  assert restored['w'].sharding.device_set == {jax.local_devices()[0]}


def test_restore_as_saved_without_checkpoint(tmp_path):
  restored, step = checkpointing.restore_latest_as_saved(tmp_path, 'gan')
  assert restored is None
  assert step is None

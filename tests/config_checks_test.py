"""Tests of config_checks.validate_config, alone and as the first step of train_and_evaluate."""

import functools
import time

import pytest

from configs import celeba, default, demo, flowers
from opengan_jax import config_checks, train

NUM_DEVICES = 4


def _folder_config(image_dir):
  config = default.get_config()
  config.dataset.source = 'folder'
  config.dataset.image_dir = str(image_dir)
  config.resolution = 32
  config.batch_size = 8
  config.extractor.batch_size = 16
  return config


def _set(config, field: str, value) -> None:
  group, _, key = field.rpartition('.')
  parent = config
  for name in group.split('.') if group else ():
    parent = parent[name]
  parent[key] = value


@pytest.mark.parametrize(
  'get_config',
  [
    default.get_config,
    demo.get_config,
    flowers.get_config,
    functools.partial(flowers.get_config, 'paper'),
    celeba.get_config,
  ],
)
def test_shipped_configs_valid(get_config):
  config_checks.validate_config(get_config(), num_devices=NUM_DEVICES)


def test_flowers_variants():
  assert flowers.get_config().extractor.arch == 'efficientnet_lite0'
  assert flowers.get_config('paper').extractor.arch == 'resnet18'
  with pytest.raises(ValueError, match="invalid variant 'resnet'"):
    flowers.get_config('resnet')


def test_folder_config_valid(tmp_path):
  config_checks.validate_config(_folder_config(tmp_path), num_devices=NUM_DEVICES)


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('resolution', 48, 'invalid resolution 48'),
    ('batch_size', 6, r'config.batch_size=6: .*multiple of the number of devices \(4\)'),
    ('extractor.batch_size', 10, r'config.extractor.batch_size=10: .*devices \(4\)'),
    ('batch_size', 0, r'config.batch_size=0: it must be an integer >= 1'),
    ('model.conditioning', 'film', r"config.model.conditioning='film': allowed values"),
    ('model.norm', 'layer', r"config.model.norm='layer': allowed values"),
    ('model.ch', 0, r'config.model.ch=0'),
    ('dataset.source', 'csv', r"config.dataset.source='csv': allowed values"),
    ('dataset.num_train_classes', 0, r'config.dataset.num_train_classes=0'),
    ('extractor.stem', 'vit', r"config.extractor.stem='vit'"),
    ('extractor.num_epochs', -1, r'config.extractor.num_epochs=-1: it must be an integer >= 0'),
    ('extractor.sigma', 0.0, r'config.extractor.sigma=0.0: it must be positive'),
    ('gan.num_steps', -5, r'config.gan.num_steps=-5: it must be an integer >= 0'),
    ('gan.d_learning_rate', 0.0, r'config.gan.d_learning_rate=0.0: it must be positive'),
    ('gan.feature_loss_weight', -1.0, r'config.gan.feature_loss_weight=-1.0'),
    ('checkpoint_every_steps', 0, r'config.checkpoint_every_steps=0'),
  ],
)
def test_invalid_value_rejected(tmp_path, field, value, message):
  config = _folder_config(tmp_path)
  _set(config, field, value)
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(config, num_devices=NUM_DEVICES)


@pytest.mark.parametrize('source', ['folder', 'tfds_image_folder'])
def test_missing_image_dir_rejected(source):
  config = default.get_config()
  config.dataset.source = source
  with pytest.raises(ValueError, match=r'config.dataset.image_dir=None: set it to a folder'):
    config_checks.validate_config(config, num_devices=NUM_DEVICES)


def test_nonexistent_image_dir_rejected(tmp_path):
  missing = tmp_path / 'no_such_folder'
  config = _folder_config(missing)
  with pytest.raises(ValueError, match='config.dataset.image_dir=.*no_such_folder.*not exist'):
    config_checks.validate_config(config, num_devices=NUM_DEVICES)


def test_batch_size_fits_one_device():
  config = default.get_config()
  config.batch_size = 6
  config_checks.validate_config(config, num_devices=1)
  config_checks.validate_config(config, num_devices=2)
  with pytest.raises(ValueError, match='for example --config.batch_size=4'):
    config_checks.validate_config(config, num_devices=4)


@pytest.mark.parametrize(
  'field, value',
  [('batch_size', 6), ('model.norm', 'layer'), ('dataset.image_dir', '/nonexistent/flowers')],
)
def test_train_and_evaluate_fails_before_work(tmp_path, field, value):
  config = _folder_config(tmp_path / 'images')
  (tmp_path / 'images').mkdir()
  _set(config, field, value)
  workdir = tmp_path / 'workdir'

  start = time.perf_counter()
  with pytest.raises(ValueError, match=field):
    train.train_and_evaluate(config, str(workdir))
  elapsed = time.perf_counter() - start

  assert not workdir.exists(), 'nothing may be written for an invalid config'
  assert elapsed < 10, f'took {elapsed:.1f} s: the config must be checked before any compiling'

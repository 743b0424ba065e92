"""Validation of a run's config before any data is loaded or anything is compiled."""

import pathlib

import ml_collections

from opengan_jax.models import architecture

CONDITIONINGS = ('feature', 'class', 'none')
NORMS = ('batch', 'instance')
SOURCES = ('tfds', 'folder', 'tfds_image_folder', 'digits')
STEMS = ('auto', 'cifar', 'imagenet')


def _fail(field: str, value, fix: str) -> None:
  raise ValueError(f'invalid config.{field}={value!r}: {fix}')


def _check_positive_int(config: ml_collections.ConfigDict, field: str, minimum: int = 1) -> None:
  value = config
  for key in field.split('.'):
    value = value[key]
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    _fail(field, value, f'it must be an integer >= {minimum}.')


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raise ValueError naming the first invalid field of `config` and how to fix it."""
  architecture.check_resolution(config.resolution)

  for field in ('batch_size', 'extractor.batch_size'):
    _check_positive_int(config, field)
  for field, value in (
    ('batch_size', config.batch_size),
    ('extractor.batch_size', config.extractor.batch_size),
  ):
    if value % num_devices:
      _fail(
        field,
        value,
        f'it must be a multiple of the number of devices ({num_devices}); '
        f'for example --config.{field}={max(num_devices, value // num_devices * num_devices)}.',
      )

  if config.model.conditioning not in CONDITIONINGS:
    _fail('model.conditioning', config.model.conditioning, f'allowed values are {CONDITIONINGS}.')
  if config.model.norm not in NORMS:
    _fail('model.norm', config.model.norm, f'allowed values are {NORMS}.')
  for field in ('model.ch', 'model.z_dim', 'extractor.feature_dim', 'dataset.num_train_classes'):
    _check_positive_int(config, field)

  dataset = config.dataset
  if dataset.source not in SOURCES:
    _fail('dataset.source', dataset.source, f'allowed values are {SOURCES}.')
  if dataset.source in ('folder', 'tfds_image_folder'):
    if not dataset.image_dir:
      _fail(
        'dataset.image_dir', dataset.image_dir, 'set it to a folder with one sub-folder per class.'
      )
    if not pathlib.Path(dataset.image_dir).is_dir():
      _fail('dataset.image_dir', dataset.image_dir, 'the folder does not exist.')
  if dataset.source == 'tfds' and not dataset.name:
    _fail('dataset.name', dataset.name, "set a tfds name such as 'oxford_flowers102'.")
  if dataset.manual_dir is not None and not pathlib.Path(dataset.manual_dir).is_dir():
    _fail('dataset.manual_dir', dataset.manual_dir, 'the folder does not exist.')

  extractor = config.extractor
  if extractor.arch != 'resnet18':
    _fail('extractor.arch', extractor.arch, "only 'resnet18' is available.")
  if extractor.stem not in STEMS:
    _fail('extractor.stem', extractor.stem, f'allowed values are {STEMS}.')
  if extractor.image_size is not None:
    _check_positive_int(config, 'extractor.image_size', minimum=16)
  if extractor.init_weights is not None and not pathlib.Path(extractor.init_weights).is_file():
    _fail('extractor.init_weights', extractor.init_weights, 'the file does not exist.')
  if not extractor.sigma > 0:
    _fail('extractor.sigma', extractor.sigma, 'it must be positive.')
  if extractor.top_k is not None:
    _check_positive_int(config, 'extractor.top_k')
  for field in (
    'extractor.cache_refresh_epochs',
    'extractor.eval_batch_size',
    'extractor.checkpoint_every_epochs',
    'log_every_steps',
    'sample_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'samples_per_source',
  ):
    _check_positive_int(config, field)
  for field in ('extractor.num_epochs', 'gan.num_steps', 'num_sample_sources'):
    _check_positive_int(config, field, minimum=0)
  for field in ('gan.g_learning_rate', 'gan.d_learning_rate', 'extractor.learning_rate'):
    group, key = field.split('.')
    if not config[group][key] > 0:
      _fail(field, config[group][key], 'it must be positive.')
  if config.gan.feature_loss_weight < 0:
    _fail('gan.feature_loss_weight', config.gan.feature_loss_weight, 'it must be >= 0.')


def extractor_stem(config: ml_collections.ConfigDict) -> str:
  """Resolve stem='auto': the 3x3 stride-1 stem for inputs of 64 px or less."""
  if config.extractor.stem != 'auto':
    return config.extractor.stem
  return 'cifar' if extractor_image_size(config) <= 64 else 'imagenet'


def extractor_image_size(config: ml_collections.ConfigDict) -> int:
  """Side of F's input in pixels (defaults to the GAN resolution)."""
  return config.extractor.image_size or config.resolution

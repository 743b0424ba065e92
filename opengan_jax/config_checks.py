"""Validation of a run's config before any data is loaded or anything is compiled."""

import pathlib

import ml_collections

from opengan_jax import efficientnet_weights
from opengan_jax.models import architecture, efficientnet, resnet

CONDITIONINGS = ('feature', 'class', 'none')
NORMS = ('batch', 'instance')
SOURCES = ('tfds', 'folder', 'tfds_image_folder', 'digits')
STEMS = ('auto', 'cifar', 'imagenet')
DTYPES = ('float32', 'bfloat16')
EXTRACTOR_ARCHS = ('resnet18', 'efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2')
_EFFICIENTNET_PREFIX = 'efficientnet_'


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
  if config.model.dtype not in DTYPES:
    _fail('model.dtype', config.model.dtype, f'allowed values are {DTYPES}.')
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
  if extractor.arch not in EXTRACTOR_ARCHS:
    _fail('extractor.arch', extractor.arch, f'allowed values are {EXTRACTOR_ARCHS}.')
  _validate_extractor_weights(config)
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
  if config.eval_every_steps is not None:
    _check_positive_int(config, 'eval_every_steps')
    _check_positive_int(config, 'eval_num_samples', minimum=2)
    if not config.evaluator_dir:
      _fail(
        'evaluator_dir',
        config.evaluator_dir,
        'eval_every_steps needs a trained evaluator: train one with `python -m '
        'opengan_jax.evaluation.train_evaluator` and pass its directory.',
      )


def _validate_extractor_weights(config: ml_collections.ConfigDict) -> None:
  """Check the fields that choose F's starting weights, head and embedding size."""
  extractor = config.extractor
  variant = extractor_variant(config)
  if not isinstance(extractor.pretrained, bool):
    _fail('extractor.pretrained', extractor.pretrained, 'it must be True or False.')
  if extractor.freeze_batch_norm is not None and not isinstance(extractor.freeze_batch_norm, bool):
    _fail('extractor.freeze_batch_norm', extractor.freeze_batch_norm, 'use True, False or None.')
  if extractor.projection_dim is not None:
    _check_positive_int(config, 'extractor.projection_dim')

  if variant is None:
    if extractor.pretrained:
      _fail(
        'extractor.pretrained',
        extractor.pretrained,
        'resnet18 has no packaged weights; convert ImageNet ResNet18 weights to an .npz with '
        '`python -m opengan_jax.pretrained convert` and set --config.extractor.init_weights=FILE.npz '
        'instead.',
      )
    if extractor.projection_dim is not None:
      _fail(
        'extractor.projection_dim',
        extractor.projection_dim,
        'only the EfficientNet-Lite extractors have a projection layer; unset it for resnet18.',
      )
  else:
    if extractor.init_weights is not None:
      _fail(
        'extractor.init_weights',
        extractor.init_weights,
        f'it holds ResNet18 weights, not {extractor.arch} weights; unset it and use '
        '--config.extractor.pretrained=True for the ImageNet weights.',
      )
    if extractor.pretrained:
      try:
        efficientnet_weights.packaged_weights_path(variant)
      except (ModuleNotFoundError, FileNotFoundError) as error:
        _fail('extractor.pretrained', extractor.pretrained, str(error))

  embedding_dim = extractor_embedding_dim(config)
  if extractor.feature_dim != embedding_dim:
    fix = f'set --config.extractor.feature_dim={embedding_dim}'
    if variant is not None and extractor.projection_dim is None:
      fix += f', or --config.extractor.projection_dim={extractor.feature_dim} to project to it'
    _fail(
      'extractor.feature_dim',
      extractor.feature_dim,
      f'{extractor.arch} with projection_dim={extractor.projection_dim} gives '
      f'{embedding_dim}-d embeddings; {fix}.',
    )


def extractor_variant(config: ml_collections.ConfigDict) -> str | None:
  """Return the EfficientNet-Lite variant of F ('lite0', 'lite1', 'lite2'), None for resnet18."""
  arch = config.extractor.arch
  if arch.startswith(_EFFICIENTNET_PREFIX):
    return arch[len(_EFFICIENTNET_PREFIX) :]
  return None


def extractor_embedding_dim(config: ml_collections.ConfigDict) -> int:
  """Size of F's output: projection_dim if set, else the backbone's pooled feature size."""
  # Configs saved by workdirs of earlier versions lack projection_dim and pretrained.
  projection_dim = config.extractor.get('projection_dim')
  if projection_dim is not None:
    return projection_dim
  return resnet.FEATURE_DIM if extractor_variant(config) is None else efficientnet.FEATURE_DIM


def extractor_is_pretrained(config: ml_collections.ConfigDict) -> bool:
  """Return whether F starts from ImageNet weights (packaged EfficientNet-Lite or init_weights)."""
  return (
    bool(config.extractor.get('pretrained', False)) or config.extractor.init_weights is not None
  )


def extractor_freeze_batch_norm(config: ml_collections.ConfigDict) -> bool:
  """Resolve freeze_batch_norm=None: frozen when F starts from pretrained weights."""
  freeze = config.extractor.get('freeze_batch_norm')
  return extractor_is_pretrained(config) if freeze is None else freeze


def extractor_stem(config: ml_collections.ConfigDict) -> str:
  """Resolve stem='auto': the 3x3 stride-1 stem for inputs of 64 px or less."""
  if config.extractor.stem != 'auto':
    return config.extractor.stem
  return 'cifar' if extractor_image_size(config) <= 64 else 'imagenet'


def extractor_image_size(config: ml_collections.ConfigDict) -> int:
  """Side of F's input in pixels.

  Defaults to the GAN resolution for resnet18 and to the ImageNet training size of an
  EfficientNet-Lite variant.
  """
  if config.extractor.image_size:
    return config.extractor.image_size
  variant = extractor_variant(config)
  if variant is None:
    return config.resolution
  return efficientnet.VARIANTS[variant].image_size

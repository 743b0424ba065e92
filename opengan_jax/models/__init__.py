"""OpenGAN networks: generator, discriminator and the feature extractors (ResNet18, EfficientNet-Lite)."""

from opengan_jax.models.architecture import (
  CONDITIONINGS,
  NORMS,
  RESOLUTIONS,
  attention_resolution,
  check_model_fields,
  check_resolution,
  discriminator_channels,
  generator_channels,
  num_blocks,
)
from opengan_jax.models.discriminator import Discriminator
from opengan_jax.models.efficientnet import EfficientNetLite
from opengan_jax.models.generator import Generator
from opengan_jax.models.resnet import ResNet18

__all__ = [
  'CONDITIONINGS',
  'NORMS',
  'RESOLUTIONS',
  'Discriminator',
  'EfficientNetLite',
  'Generator',
  'ResNet18',
  'attention_resolution',
  'check_model_fields',
  'check_resolution',
  'discriminator_channels',
  'generator_channels',
  'num_blocks',
]

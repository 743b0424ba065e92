"""Build G, D and F from a config.

This module imports no TensorFlow, so the benchmarks build the same networks as the training
job without the roughly 530 MB of resident memory that clu's TensorBoard writer adds by
importing TensorFlow (jax 0.10.2, tensorflow-cpu 2.21).
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from opengan_jax import config_checks
from opengan_jax.models import Discriminator, EfficientNetLite, Generator, ResNet18


def make_networks(
  config: ml_collections.ConfigDict, num_classes: int
) -> tuple[Generator, Discriminator]:
  """Build G and D (with axis_name=None) from the config."""
  common = dict(
    resolution=config.resolution,
    ch=config.model.ch,
    feature_dim=config.extractor.feature_dim,
    conditioning=config.model.conditioning,
    norm=config.model.norm,
    centred_scale=config.model.centred_scale,
    num_classes=num_classes if config.model.conditioning == 'class' else None,
    dtype=compute_dtype(config),
  )
  return Generator(z_dim=config.model.z_dim, **common), Discriminator(**common)


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """Return config.model.dtype as a dtype. Workdir configs saved without the field mean float32."""
  return jnp.dtype(config.model.get('dtype', 'float32'))


def make_extractor(config: ml_collections.ConfigDict) -> nn.Module:
  """Build F (with axis_name=None) from the config: a ResNet18 or an EfficientNetLite."""
  freeze_batch_norm = config_checks.extractor_freeze_batch_norm(config)
  variant = config_checks.extractor_variant(config)
  if variant is None:
    return ResNet18(stem=config_checks.extractor_stem(config), freeze_batch_norm=freeze_batch_norm)
  return EfficientNetLite(
    variant=variant,
    projection_dim=config.extractor.get('projection_dim'),
    freeze_batch_norm=freeze_batch_norm,
  )

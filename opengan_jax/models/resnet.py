"""ResNet18 feature extractor F: the standard ResNet18 without its classifier, giving 512-d.

Convs have no bias and no spectral norm. Padding is symmetric as in torchvision's ResNet
(Flax's 'SAME' pads stride-2 convs asymmetrically). Inputs are images in [-1, 1] and are used
as they are, without ImageNet mean and standard deviation.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from opengan_jax.models import layers

STEMS = ('cifar', 'imagenet')
FEATURE_DIM = 512

# He-normal init over the output fan, as torchvision initialises ResNet convs.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(features: int, kernel_size: int, stride: int, dtype: layers.Dtype, name: str) -> nn.Conv:
  pad = (kernel_size - 1) // 2
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    dtype=dtype,
    kernel_init=_CONV_INIT,
    name=name,
  )


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm; a 1x1 conv and BatchNorm shortcut when the shape changes."""

  features: int
  stride: int = 1
  freeze_batch_norm: bool = False
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    batch_norm = functools.partial(
      layers.Normalization, 'batch', use_affine=True, axis_name=self.axis_name
    )
    norm_train = train and not self.freeze_batch_norm
    h = _conv(self.features, 3, self.stride, self.dtype, 'conv1')(x)
    h = nn.relu(batch_norm(name='bn1')(h, norm_train))
    h = _conv(self.features, 3, 1, self.dtype, 'conv2')(h)
    h = batch_norm(name='bn2')(h, norm_train)

    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.stride, self.dtype, 'shortcut_conv')(x)
      shortcut = batch_norm(name='shortcut_bn')(shortcut, norm_train)
    return nn.relu(h + shortcut)


class ResNet18(nn.Module):
  """ResNet18 (BasicBlock, [2, 2, 2, 2], 64-512 channels) ending in global average pooling.

  Attributes:
    stem: 'cifar' (3x3 stride-1 conv, no max-pool; for small images) or 'imagenet' (7x7
      stride-2 conv and 3x3 stride-2 max-pool).
    freeze_batch_norm: Whether BatchNorm uses its running statistics and leaves them unchanged
      even with train=True, as when fine-tuning pretrained weights.
    axis_name: Data-parallel axis for BatchNorm statistics; None on a single device.
    dtype: Computation dtype of the convs; BatchNorm runs in float32.
  """

  stem: str = 'cifar'
  freeze_batch_norm: bool = False
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    if self.stem not in STEMS:
      allowed = ', '.join(repr(s) for s in STEMS)
      raise ValueError(f'invalid stem {self.stem!r}: expected one of {allowed}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Return float32 features (B, 512) for images x (B, H, W, 3) in [-1, 1]."""
    if self.stem == 'cifar':
      h = _conv(64, 3, 1, self.dtype, 'stem_conv')(x)
    else:
      h = _conv(64, 7, 2, self.dtype, 'stem_conv')(x)
    h = layers.Normalization('batch', use_affine=True, axis_name=self.axis_name, name='stem_bn')(
      h, train and not self.freeze_batch_norm
    )
    h = nn.relu(h)
    if self.stem == 'imagenet':
      h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    for stage, features in enumerate((64, 128, 256, 512)):
      for index in range(2):
        stride = 2 if stage > 0 and index == 0 else 1
        h = BasicBlock(
          features,
          stride,
          freeze_batch_norm=self.freeze_batch_norm,
          axis_name=self.axis_name,
          dtype=self.dtype,
          name=f'stage{stage}_block{index}',
        )(h, train)
    return jnp.mean(h.astype(jnp.float32), axis=(1, 2))

"""EfficientNet-Lite feature extractor F (Lite0, Lite1 and Lite2 from one width/depth table).

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 in place of swish and
with the stem (32 channels) and head (1280 channels) kept at their base width in every variant.
The layout follows the TensorFlow model that the packaged ImageNet weights were trained in. Convs
have no bias and use TensorFlow SAME padding, which puts the extra pixel of a stride-2 conv at the
bottom and right. BatchNorm uses epsilon 1e-3, and inputs are scaled as (pixel - 127) / 128 from
0..255 pixels.

Departure from the TensorFlow training setup: there is no stochastic depth (drop connect) and no
dropout before the classifier, because F is trained here by a step function without dropout rngs.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STEM_CHANNELS = 32
FEATURE_DIM = 1280  # Channels of the head conv, and size of the pooled feature.
BATCH_NORM_EPSILON = 1e-3  # The value the ImageNet weights were trained with.
# The momentum of the library's other BatchNorm layers, which the extractor's calibration assumes.
BATCH_NORM_MOMENTUM = 0.9
_CHANNEL_DIVISOR = 8


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  """Scaling of one EfficientNet-Lite variant."""

  width: float  # Multiplier of the block channels.
  depth: float  # Multiplier of the blocks per stage, except the first and last stage.
  image_size: int  # Input side in pixels the ImageNet weights were trained at.


VARIANTS = {
  'lite0': VariantSpec(width=1.0, depth=1.0, image_size=224),
  'lite1': VariantSpec(width=1.0, depth=1.1, image_size=240),
  'lite2': VariantSpec(width=1.1, depth=1.2, image_size=260),
}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One inverted-residual (MBConv) block."""

  expand_ratio: int
  kernel_size: int
  stride: int
  input_channels: int
  output_channels: int


# The seven stages of EfficientNet-B0: (expand ratio, kernel, stride, input, output, blocks).
_BASE_STAGES = (
  (1, 3, 1, 32, 16, 1),
  (6, 3, 2, 16, 24, 2),
  (6, 5, 2, 24, 40, 2),
  (6, 3, 2, 40, 80, 3),
  (6, 5, 1, 80, 112, 3),
  (6, 5, 2, 112, 192, 4),
  (6, 3, 1, 192, 320, 1),
)


def round_channels(channels: int, width: float) -> int:
  """Scale `channels` by `width` and round to a multiple of 8, never more than 10% down."""
  scaled = channels * width
  rounded = max(
    _CHANNEL_DIVISOR, int(scaled + _CHANNEL_DIVISOR / 2) // _CHANNEL_DIVISOR * _CHANNEL_DIVISOR
  )
  if rounded < 0.9 * scaled:
    rounded += _CHANNEL_DIVISOR
  return int(rounded)


def block_specs(variant: str) -> tuple[BlockSpec, ...]:
  """Return the blocks of `variant` in order.

  Lite keeps the block count of the first and last stage unscaled; the other stages get
  ceil(depth * blocks).
  """
  spec = VARIANTS[variant]
  blocks = []
  last_stage = len(_BASE_STAGES) - 1
  for stage, (expand, kernel, stride, inputs, outputs, repeats) in enumerate(_BASE_STAGES):
    if 0 < stage < last_stage:
      repeats = int(math.ceil(spec.depth * repeats))
    input_channels = round_channels(inputs, spec.width)
    output_channels = round_channels(outputs, spec.width)
    for index in range(repeats):
      blocks.append(
        BlockSpec(
          expand_ratio=expand,
          kernel_size=kernel,
          stride=stride if index == 0 else 1,
          input_channels=input_channels if index == 0 else output_channels,
          output_channels=output_channels,
        )
      )
  return tuple(blocks)


def _conv(features: int, kernel_size: int, stride: int, dtype: Any, name: str, groups: int = 1):
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(stride, stride),
    padding='SAME',  # lax's SAME pads as TensorFlow does: the odd pixel goes after.
    feature_group_count=groups,
    use_bias=False,
    dtype=dtype,
    kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
    name=name,
  )


class ConvBatchNorm(nn.Module):
  """Conv without bias, BatchNorm and optionally ReLU6; the BatchNorm runs in float32.

  Attributes:
    features: Output channels.
    kernel_size: Side of the square kernel.
    stride: Stride of the conv.
    depthwise: Whether the conv is depthwise (one filter per input channel).
    activate: Whether ReLU6 follows the BatchNorm.
    freeze_batch_norm: Whether BatchNorm uses and keeps its running statistics with train=True.
    axis_name: Data-parallel axis for BatchNorm statistics; None on a single device.
    dtype: Computation dtype of the conv.
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  depthwise: bool = False
  activate: bool = True
  freeze_batch_norm: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    groups = self.features if self.depthwise else 1
    h = _conv(self.features, self.kernel_size, self.stride, self.dtype, 'conv', groups)(
      x.astype(self.dtype)
    )
    h = nn.BatchNorm(
      use_running_average=not train or self.freeze_batch_norm,
      momentum=BATCH_NORM_MOMENTUM,
      epsilon=BATCH_NORM_EPSILON,
      axis_name=self.axis_name,
      dtype=jnp.float32,
      name='bn',
    )(h.astype(jnp.float32))
    return jax.nn.relu6(h) if self.activate else h


class MBConvBlock(nn.Module):
  """Inverted-residual block: 1x1 expansion, depthwise conv, 1x1 linear projection.

  The input is added back when the block keeps the stride at 1 and the channel count.
  """

  spec: BlockSpec
  freeze_batch_norm: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    spec = self.spec
    layer = functools.partial(
      ConvBatchNorm,
      freeze_batch_norm=self.freeze_batch_norm,
      axis_name=self.axis_name,
      dtype=self.dtype,
    )
    channels = spec.input_channels * spec.expand_ratio
    h = x
    if spec.expand_ratio != 1:
      h = layer(channels, name='expand')(h, train)
    h = layer(channels, spec.kernel_size, spec.stride, depthwise=True, name='depthwise')(h, train)
    h = layer(spec.output_channels, activate=False, name='project')(h, train)
    if spec.stride == 1 and spec.input_channels == spec.output_channels:
      h = h + x.astype(jnp.float32)
    return h


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite backbone ending in global average pooling.

  Attributes:
    variant: 'lite0', 'lite1' or 'lite2'.
    num_classes: If set, the output is logits of a linear classifier on the pooled feature
      (1000 for the ImageNet weights).
    projection_dim: If set, the output is a linear projection of the pooled 1280-d feature to
      this size. Cannot be combined with num_classes.
    freeze_batch_norm: Whether BatchNorm uses its running statistics and leaves them unchanged
      even with train=True, as when fine-tuning pretrained weights on small batches.
    axis_name: Data-parallel axis for BatchNorm statistics; None on a single device.
    dtype: Computation dtype of the convs; BatchNorm and the output are float32.
  """

  variant: str = 'lite0'
  num_classes: int | None = None
  projection_dim: int | None = None
  freeze_batch_norm: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f'invalid variant {self.variant!r}: expected one of {sorted(VARIANTS)}')
    if self.num_classes is not None and self.projection_dim is not None:
      raise ValueError('set num_classes or projection_dim, not both')
    super().__post_init__()

  @property
  def output_dim(self) -> int:
    """Size of the output rows."""
    return self.num_classes or self.projection_dim or FEATURE_DIM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Return float32 (B, output_dim) for images x (B, H, W, 3) in [-1, 1]."""
    common = dict(
      freeze_batch_norm=self.freeze_batch_norm, axis_name=self.axis_name, dtype=self.dtype
    )
    # [-1, 1] back to 0..255 pixels p = 127.5 (x + 1), then the trained scaling (p - 127) / 128.
    h = (127.5 * x.astype(jnp.float32) + 0.5) / 128.0
    h = ConvBatchNorm(STEM_CHANNELS, 3, 2, name='stem', **common)(h, train)
    for index, spec in enumerate(block_specs(self.variant)):
      h = MBConvBlock(spec, name=f'block{index}', **common)(h, train)
    h = ConvBatchNorm(FEATURE_DIM, name='head', **common)(h, train)

    features = jnp.mean(h, axis=(1, 2))
    if self.num_classes is not None:
      return nn.Dense(self.num_classes, dtype=jnp.float32, name='classifier')(features)
    if self.projection_dim is not None:
      return nn.Dense(self.projection_dim, dtype=jnp.float32, name='projection')(features)
    return features

"""OpenGAN discriminator D(x, f): a SAGAN-style ResNet discriminator.

Layout (Table 3b of the OpenGAN paper, generalised to R in 32..256): a 3x3 stem conv,
n = log2(R) - 2 down blocks with self-attention after the block whose output side is
attention_resolution(R), then one conditional norm, ReLU and a 4x4 valid conv to one logit.
The OpenGAN paper replaces SAGAN's projection head with this conditional norm, the only norm in D.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from opengan_jax.models import architecture, layers


class ResBlockDown(nn.Module):
  """Residual down block without norms: ReLU, conv3, ReLU, conv3, 2x2 average pool.

  The first conv keeps the input channels and the second maps to `features`. The shortcut is
  a 1x1 conv followed by the same pooling.
  """

  features: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_channels = x.shape[-1]
    h = layers.SNConv(in_channels, 3, dtype=self.dtype, name='conv1')(nn.relu(x), train)
    h = layers.SNConv(self.features, 3, dtype=self.dtype, name='conv2')(nn.relu(h), train)
    h = layers.avg_pool2(h)

    shortcut = layers.SNConv(self.features, 1, dtype=self.dtype, name='shortcut')(x, train)
    return h + layers.avg_pool2(shortcut)


class Discriminator(nn.Module):
  """Discriminator mapping an R x R RGB image in [-1, 1] and a condition to one logit.

  Attributes:
    resolution: Input side in pixels: 32, 64, 128 or 256.
    ch: Channel multiplier (32 in the OpenGAN paper).
    feature_dim: Size of the condition vector f, and of the class embedding for 'class'.
    conditioning: 'feature' (OpenGAN, cond is f of shape (B, feature_dim)), 'class' (C-SAGAN,
      cond is int labels (B,)) or 'none' (U-SAGAN, cond is ignored).
    norm: 'batch' or 'instance' statistics in the final norm.
    centred_scale: Conditional-norm scale is 1 + Linear(cond) when True, Linear(cond) when False.
    num_classes: Size of the class embedding table; required for conditioning='class'.
    axis_name: Data-parallel axis for BatchNorm statistics; None on a single device.
    dtype: Computation dtype of convs; norms and softmax run in float32.
  """

  resolution: int
  ch: int = 32
  feature_dim: int = 512
  conditioning: str = 'feature'
  norm: str = 'batch'
  centred_scale: bool = True
  num_classes: int | None = None
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    architecture.check_model_fields(self.resolution, self.conditioning, self.norm, self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array | None, train: bool) -> jax.Array:
    """Return float32 logits (B,) for images x (B, R, R, 3)."""
    expected = (self.resolution, self.resolution, 3)
    if x.ndim != 4 or x.shape[1:] != expected:
      raise ValueError(
        f'expected images of shape (B, {", ".join(map(str, expected))}), got {x.shape}'
      )
    cond = layers.condition_vector(
      cond, self.conditioning, self.feature_dim, self.num_classes, batch_size=x.shape[0]
    )
    channels = architecture.discriminator_channels(self.resolution, self.ch)
    attention_side = architecture.attention_resolution(self.resolution)

    h = layers.SNConv(channels[0], 3, dtype=self.dtype, name='conv_in')(x, train)
    for i, features in enumerate(channels[1:]):
      h = ResBlockDown(features, dtype=self.dtype, name=f'block{i}')(h, train)
      if h.shape[1] == attention_side:
        h = layers.SelfAttention(dtype=self.dtype, name='attention')(h, train)

    h = layers.normalize(
      h,
      cond,
      train,
      conditioning=self.conditioning,
      norm=self.norm,
      centred_scale=self.centred_scale,
      axis_name=self.axis_name,
      name='norm',
    )
    logits = layers.SNConv(1, 4, padding='VALID', dtype=self.dtype, name='conv_out')(
      nn.relu(h), train
    )
    return logits.reshape(x.shape[0]).astype(jnp.float32)

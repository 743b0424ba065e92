"""OpenGAN generator G(z, f): a SAGAN-style ResNet generator with conditional normalisation.

Layout (Table 3a of the OpenGAN paper, generalised to R in 32..256): a spectrally normalised
linear map from z to a 4x4 map, n = log2(R) - 2 up blocks with self-attention after the block
whose output side is attention_resolution(R), then BatchNorm, ReLU, a 3x3 conv to RGB and tanh.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from opengan_jax.models import architecture, layers


class ResBlockUp(nn.Module):
  """Residual up block: norm, ReLU, 2x up, conv3, norm, ReLU, conv3; shortcut 2x up, conv1.

  The first conv keeps the input channels and the second maps to `features`, so both norms
  normalise the input channels, as in the authors' code.
  """

  features: int
  conditioning: str = 'feature'
  norm: str = 'batch'
  centred_scale: bool = True
  axis_name: str | None = None
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array | None, train: bool) -> jax.Array:
    in_channels = x.shape[-1]

    def norm(y: jax.Array, name: str) -> jax.Array:
      return layers.normalize(
        y,
        cond,
        train,
        conditioning=self.conditioning,
        norm=self.norm,
        centred_scale=self.centred_scale,
        axis_name=self.axis_name,
        name=name,
      )

    h = nn.relu(norm(x, 'norm1'))
    h = layers.upsample_nearest(h)
    h = layers.SNConv(in_channels, 3, dtype=self.dtype, name='conv1')(h, train)
    h = nn.relu(norm(h, 'norm2'))
    h = layers.SNConv(self.features, 3, dtype=self.dtype, name='conv2')(h, train)

    shortcut = layers.upsample_nearest(x)
    shortcut = layers.SNConv(self.features, 1, dtype=self.dtype, name='shortcut')(shortcut, train)
    return h + shortcut


class Generator(nn.Module):
  """Generator mapping a latent z and a condition to an R x R RGB image in [-1, 1].

  Attributes:
    resolution: Output side in pixels: 32, 64, 128 or 256.
    ch: Channel multiplier (32 in the OpenGAN paper).
    z_dim: Size of the latent z.
    feature_dim: Size of the condition vector f, and of the class embedding for 'class'.
    conditioning: 'feature' (OpenGAN, cond is f of shape (B, feature_dim)), 'class' (C-SAGAN,
      cond is int labels (B,)) or 'none' (U-SAGAN, cond is ignored).
    norm: 'batch' or 'instance' statistics in the norm layers.
    centred_scale: Conditional-norm scale is 1 + Linear(cond) when True, Linear(cond) when False.
    num_classes: Size of the class embedding table; required for conditioning='class'.
    axis_name: Data-parallel axis for BatchNorm statistics; None on a single device.
    dtype: Computation dtype of convs and linears; norms and softmax run in float32.
  """

  resolution: int
  ch: int = 32
  z_dim: int = 128
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
  def __call__(self, z: jax.Array, cond: jax.Array | None, train: bool) -> jax.Array:
    """Return images (B, R, R, 3) float32 in [-1, 1] for latents z (B, z_dim)."""
    if z.ndim != 2 or z.shape[-1] != self.z_dim:
      raise ValueError(f'expected z of shape (B, {self.z_dim}), got {z.shape}')
    cond = layers.condition_vector(
      cond, self.conditioning, self.feature_dim, self.num_classes, batch_size=z.shape[0]
    )
    channels = architecture.generator_channels(self.resolution, self.ch)
    attention_side = architecture.attention_resolution(self.resolution)

    x = layers.SNDense(4 * 4 * channels[0], dtype=self.dtype, name='linear')(z, train)
    x = x.reshape(z.shape[0], 4, 4, channels[0])
    for i, features in enumerate(channels[1:]):
      x = ResBlockUp(
        features,
        conditioning=self.conditioning,
        norm=self.norm,
        centred_scale=self.centred_scale,
        axis_name=self.axis_name,
        dtype=self.dtype,
        name=f'block{i}',
      )(x, cond, train)
      if x.shape[1] == attention_side:
        x = layers.SelfAttention(dtype=self.dtype, name='attention')(x, train)

    # A plain affine norm for every conditioning, as in the authors' code.
    x = layers.Normalization(self.norm, use_affine=True, axis_name=self.axis_name, name='out_norm')(
      x, train
    )
    x = layers.SNConv(3, 3, dtype=self.dtype, name='conv_out')(nn.relu(x), train)
    return jnp.tanh(x.astype(jnp.float32))

"""Layers shared by the generator and the discriminator.

Spectral normalisation (one power iteration per call) wraps every conv and dense weight except
the conditional-norm linears and the class embedding. Its u vectors and sigma estimates live
in the 'spectral' collection and are updated only when `train` is True.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from opengan_jax.models import architecture

SPECTRAL_COLLECTION = 'spectral'
# Flax's momentum weights the old running average, while PyTorch's weights the new batch, so
# 0.9 here is the same update as PyTorch's default of 0.1.
BATCH_NORM_MOMENTUM = 0.9
NORM_EPSILON = 1e-5

# Spectrally normalised layers start from Xavier-uniform weights and zero biases, as in SAGAN.
SN_KERNEL_INIT = nn.initializers.xavier_uniform()

Dtype = jnp.dtype | type


class SNConv(nn.Module):
  """Stride-1 conv with a spectrally normalised kernel.

  Attributes:
    features: Output channels.
    kernel_size: Side of the square kernel.
    padding: 'SAME' keeps the spatial size (odd kernels pad (kernel_size - 1) // 2 on each
      side), 'VALID' pads nothing.
    use_bias: Whether the conv adds a bias.
    dtype: Computation dtype; parameters and the power iteration stay float32.
  """

  features: int
  kernel_size: int = 3
  padding: str = 'SAME'
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = nn.Conv(
      self.features,
      (self.kernel_size, self.kernel_size),
      padding=self.padding,
      use_bias=self.use_bias,
      dtype=self.dtype,
      kernel_init=SN_KERNEL_INIT,
      name='conv',
    )
    spectral_norm = nn.SpectralNorm(conv, collection_name=SPECTRAL_COLLECTION, name='sn')
    return spectral_norm(x, update_stats=train)


class SNDense(nn.Module):
  """Dense layer with a spectrally normalised kernel and a bias."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dense = nn.Dense(self.features, dtype=self.dtype, kernel_init=SN_KERNEL_INIT, name='dense')
    spectral_norm = nn.SpectralNorm(dense, collection_name=SPECTRAL_COLLECTION, name='sn')
    return spectral_norm(x, update_stats=train)


class Normalization(nn.Module):
  """BatchNorm or InstanceNorm over NHWC maps, computed and returned in float32.

  Attributes:
    kind: 'batch' (statistics over batch and space, running averages in 'batch_stats') or
      'instance' (statistics over space, per sample and channel).
    use_affine: Whether the layer learns a per-channel scale and bias.
    axis_name: Data-parallel axis over which BatchNorm averages batch statistics; None on a
      single device.
  """

  kind: str = 'batch'
  use_affine: bool = True
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.kind == 'batch':
      return nn.BatchNorm(
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=NORM_EPSILON,
        use_scale=self.use_affine,
        use_bias=self.use_affine,
        axis_name=self.axis_name,
        dtype=jnp.float32,
        name='batch_norm',
      )(x)
    if self.kind == 'instance':
      return nn.InstanceNorm(
        epsilon=NORM_EPSILON,
        use_scale=self.use_affine,
        use_bias=self.use_affine,
        dtype=jnp.float32,
        name='instance_norm',
      )(x)
    allowed = ', '.join(repr(n) for n in architecture.NORMS)
    raise ValueError(f'invalid norm {self.kind!r}: expected one of {allowed}')


class ConditionalNorm(nn.Module):
  """Normalisation whose per-sample scale and bias are linear functions of a condition vector.

  y = norm(x) * s + b with s = 1 + Linear(cond) when `centred_scale`, else s = Linear(cond),
  and b = Linear(cond). The two linears have biases and no spectral norm. Their kernels use
  Flax's default LeCun-normal init and their biases start at zero, so with `centred_scale`
  the layer starts close to a plain normalisation.

  Attributes:
    kind: 'batch' or 'instance': the statistics of the non-affine normalisation.
    centred_scale: Whether the scale is 1 + Linear(cond) instead of Linear(cond). The authors'
      code uses Linear(cond).
    axis_name: Data-parallel axis for BatchNorm statistics; None on a single device.
  """

  kind: str = 'batch'
  centred_scale: bool = True
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    normalized = Normalization(self.kind, use_affine=False, axis_name=self.axis_name, name='norm')(
      x, train
    )

    cond = cond.astype(jnp.float32)
    scale = nn.Dense(channels, dtype=jnp.float32, name='scale')(cond)
    bias = nn.Dense(channels, dtype=jnp.float32, name='bias')(cond)
    if self.centred_scale:
      scale = 1.0 + scale
    return normalized * scale[:, None, None, :] + bias[:, None, None, :]


def normalize(
  x: jax.Array,
  cond: jax.Array | None,
  train: bool,
  *,
  conditioning: str,
  norm: str,
  centred_scale: bool,
  axis_name: str | None,
  name: str,
) -> jax.Array:
  """Apply the norm layer that `conditioning` selects, as a child `name` of the calling module.

  Must be called inside a compact method. 'feature' and 'class' use a ConditionalNorm on
  `cond`, the feature vector or the class embedding (B, feature_dim). 'none' ignores `cond`.
  """
  if conditioning == 'none':
    # U-SAGAN: section 5.2 of the OpenGAN paper gives the unconditional baseline non-conditional
    # norms, but its appendix A gives the baseline none. We follow section 5.2.
    return Normalization(norm, use_affine=True, axis_name=axis_name, name=name)(x, train)
  if cond is None:
    raise ValueError(f'conditioning={conditioning!r} needs a condition vector, got None')
  return ConditionalNorm(norm, centred_scale, axis_name=axis_name, name=name)(x, cond, train)


def condition_vector(
  cond: jax.Array | None,
  conditioning: str,
  feature_dim: int,
  num_classes: int | None,
  batch_size: int,
) -> jax.Array | None:
  """Turn the network's `cond` input into the (B, feature_dim) vector its norm layers take.

  Must be called inside the compact method of the network that owns the class embedding.
  'feature': checks and returns f. 'class': looks the labels up in a learned embedding named
  'class_embedding' (no spectral norm). 'none': returns None.
  """
  if conditioning == 'none':
    return None
  if conditioning == 'class':
    if cond is None or cond.shape != (batch_size,):
      shape = None if cond is None else cond.shape
      raise ValueError(
        f"invalid cond for conditioning='class': expected class labels of shape ({batch_size},), "
        f'got {shape}'
      )
    embedding = nn.Embed(num_classes, feature_dim, name='class_embedding')
    return embedding(cond)
  if cond is None or cond.shape != (batch_size, feature_dim):
    shape = None if cond is None else cond.shape
    raise ValueError(
      f"invalid cond for conditioning='feature': expected features of shape "
      f'({batch_size}, {feature_dim}), got {shape}'
    )
  return cond


class SelfAttention(nn.Module):
  """SAGAN self-attention with a residual connection: x + gamma * attention(x).

  Query and key have C/8 channels and the value C/2, all from 1x1 spectrally normalised convs
  without bias. Keys and values are max-pooled 2x2, so each position attends to HW/4 places.
  gamma starts at 0, so the block starts as the identity. Softmax runs in float32.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    batch, height, width, channels = x.shape
    if channels % 8:
      raise ValueError(f'SelfAttention needs channels divisible by 8, got {channels}')
    qk_channels, v_channels = channels // 8, channels // 2

    def projection(features: int, name: str) -> SNConv:
      return SNConv(features, kernel_size=1, use_bias=False, dtype=self.dtype, name=name)

    def pool(y: jax.Array) -> jax.Array:
      return nn.max_pool(y, (2, 2), strides=(2, 2))

    query = projection(qk_channels, 'query')(x, train).reshape(batch, -1, qk_channels)
    key = pool(projection(qk_channels, 'key')(x, train)).reshape(batch, -1, qk_channels)
    value = pool(projection(v_channels, 'value')(x, train)).reshape(batch, -1, v_channels)

    logits = jnp.einsum('bqd,bkd->bqk', query, key, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    attended = jnp.einsum('bqk,bkd->bqd', weights, value)
    attended = attended.reshape(batch, height, width, v_channels)
    out = projection(channels, 'output')(attended, train)

    gamma = self.param('gamma', nn.initializers.zeros, (), jnp.float32)
    return x + gamma * out


def upsample_nearest(x: jax.Array) -> jax.Array:
  """Double the height and width of an NHWC map by nearest-neighbour repetition."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
  """Halve the height and width of an NHWC map by 2x2 average pooling."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))

"""Channel schedules and field checks shared by the generator and the discriminator.

The schedules follow Table 3 of the OpenGAN paper (appendix A), which gives the 256 px model
with channel multiplier 32. Smaller resolutions keep part of that schedule: with
n = log2(R) - 2 residual blocks between the 4x4 map and R x R, the generator keeps its last n
blocks and the discriminator its first n, so the two mirror each other.
"""

import math
from collections.abc import Sequence

RESOLUTIONS = (32, 64, 128, 256)
CONDITIONINGS = ('feature', 'class', 'none')
NORMS = ('batch', 'instance')

# Channel multipliers of the 256 px model. Generator: the 4x4 input map, then the output of
# each of its 6 up blocks. Discriminator: the stem conv, then the output of each of its 6
# down blocks.
_GENERATOR_MULTIPLIERS_256 = (16, 16, 8, 8, 4, 2, 1)
_DISCRIMINATOR_MULTIPLIERS_256 = (1, 2, 4, 8, 8, 16, 16)


def check_resolution(resolution: int) -> None:
  """Raise ValueError unless `resolution` is one of RESOLUTIONS."""
  if resolution not in RESOLUTIONS:
    allowed = ', '.join(str(r) for r in RESOLUTIONS)
    raise ValueError(f'invalid resolution {resolution!r}: expected one of {allowed}')


def num_blocks(resolution: int) -> int:
  """Return the number of residual blocks between the 4x4 map and `resolution`."""
  check_resolution(resolution)
  return int(math.log2(resolution)) - 2


def generator_channels(resolution: int, ch: int) -> tuple[int, ...]:
  """Return the generator's channels: the 4x4 input map, then each up block's output."""
  n = num_blocks(resolution)
  return tuple(m * ch for m in _GENERATOR_MULTIPLIERS_256[-(n + 1) :])


def discriminator_channels(resolution: int, ch: int) -> tuple[int, ...]:
  """Return the discriminator's channels: the stem conv, then each down block's output."""
  n = num_blocks(resolution)
  return tuple(m * ch for m in _DISCRIMINATOR_MULTIPLIERS_256[: n + 1])


def attention_resolution(resolution: int) -> int:
  """Return the side of the feature map that self-attention follows in G and D.

  The OpenGAN paper places attention on the 64x64 map of its 256 px model, i.e. at R/4. Smaller
  models keep it at 16x16 or above.
  """
  check_resolution(resolution)
  return max(resolution // 4, 16)


def _check_choice(field: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    choices = ', '.join(repr(a) for a in allowed)
    raise ValueError(f'invalid {field} {value!r}: expected one of {choices}')


def check_model_fields(
  resolution: int, conditioning: str, norm: str, num_classes: int | None
) -> None:
  """Raise ValueError naming the first invalid field of a Generator or Discriminator."""
  check_resolution(resolution)
  _check_choice('conditioning', conditioning, CONDITIONINGS)
  _check_choice('norm', norm, NORMS)
  if conditioning == 'class' and (num_classes is None or num_classes < 1):
    raise ValueError(
      f"conditioning='class' needs num_classes >= 1 for the class embedding, got {num_classes!r}"
    )

"""Pillow decoding of image files into square uint8 RGB arrays."""

import numpy as np
from PIL import Image, ImageOps

# Modes whose alpha channel is composited on white.
_ALPHA_MODES = frozenset({'RGBA', 'RGBa', 'LA', 'La', 'PA'})
# 16-bit integer modes, whose values are scaled from [0, 65535] to [0, 255].
_UINT16_MODES = frozenset({'I;16', 'I;16L', 'I;16B', 'I;16N'})

# Errors that mean "this file is not a readable image". Pillow raises OSError for unknown formats
# (UnidentifiedImageError) and truncated files, and DecompressionBombError for huge images.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _gray_to_rgb(array: np.ndarray) -> Image.Image:
  gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
  return Image.fromarray(gray).convert('RGB')


def to_rgb(image: Image.Image) -> Image.Image:
  """Convert an image of any Pillow mode to 8-bit RGB.

  Alpha is composited on white, and 16-bit images are scaled to 8 bits. Mode 'I' (32-bit
  integer) is read as 16-bit data when its maximum exceeds 255, else as 8-bit data. Mode 'F'
  (float) is read as values in [0, 1] when its maximum is at most 1, else in [0, 255].
  """
  mode = image.mode
  if mode == 'RGB':
    return image
  if mode == 'P':
    has_alpha = 'transparency' in image.info
    return to_rgb(image.convert('RGBA' if has_alpha else 'RGB'))
  if mode in _ALPHA_MODES:
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))
    background.alpha_composite(image.convert('RGBA'))
    return background.convert('RGB')
  if mode in _UINT16_MODES:
    return _gray_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
  if mode == 'I':
    array = np.asarray(image, dtype=np.float64)
    if array.max(initial=0) > 255:
      array = np.clip(array, 0, 65535) / 257.0
    return _gray_to_rgb(array)
  if mode == 'F':
    array = np.asarray(image, dtype=np.float64)
    if array.max(initial=0) <= 1.0:
      array = array * 255.0
    return _gray_to_rgb(array)
  # '1', 'L', 'CMYK', 'YCbCr', 'LAB', 'HSV' and other 8-bit modes.
  return image.convert('RGB')


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
  """Resize an image's shorter side to `resolution` and cut out the centred square.

  The centred square is cut from the source and resized in one step, with Pillow's antialiased
  bicubic filter. Returns uint8 (resolution, resolution, 3).
  """
  width, height = image.size
  side = min(width, height)
  left = (width - side) / 2
  top = (height - side) / 2
  box = (left, top, left + side, top + side)
  resized = image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
  return np.asarray(resized, dtype=np.uint8)


def load_image(path: str, resolution: int) -> np.ndarray:
  """Decode an image file into uint8 (resolution, resolution, 3).

  Raises one of DECODE_ERRORS when the file is not a readable image.
  """
  with Image.open(path) as image:
    # JPEG only: decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least
    # `resolution`, which is much faster than decoding at full size. Other formats ignore it.
    image.draft(None, (resolution, resolution))
    image.load()
    image = ImageOps.exif_transpose(image)
    return center_crop_resize(to_rgb(image), resolution)

"""Image grids for sample sheets: arrays in [-1, 1] to uint8 tiles and PNG files."""

import pathlib

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Map float images in [-1, 1] to uint8 in [0, 255] (values outside are clipped)."""
  images = np.asarray(images, np.float32)
  return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(rows: np.ndarray, padding: int = 2, pad_value: int = 255) -> np.ndarray:
  """Tile images of shape (rows, columns, H, W, 3), uint8, into one (H', W', 3) uint8 image."""
  rows = np.asarray(rows)
  if rows.ndim != 5 or rows.shape[-1] != 3:
    raise ValueError(f'expected images of shape (rows, columns, H, W, 3), got {rows.shape}')
  num_rows, num_cols, height, width, _ = rows.shape
  grid = np.full(
    (
      num_rows * (height + padding) + padding,
      num_cols * (width + padding) + padding,
      3,
    ),
    pad_value,
    np.uint8,
  )
  for r in range(num_rows):
    for c in range(num_cols):
      top = padding + r * (height + padding)
      left = padding + c * (width + padding)
      grid[top : top + height, left : left + width] = rows[r, c]
  return grid


def source_sample_grid(sources: np.ndarray, samples: np.ndarray) -> np.ndarray:
  """Build a grid whose rows are a source image followed by the samples generated from it.

  sources: (S, H, W, 3) in [-1, 1]; samples: (S, K, H, W, 3) in [-1, 1]. Returns uint8.
  """
  rows = np.concatenate([np.asarray(sources)[:, None], np.asarray(samples)], axis=1)
  return make_grid(to_uint8(rows))


def save_png(image: np.ndarray, path: str | pathlib.Path) -> pathlib.Path:
  """Write a uint8 (H, W, 3) image as PNG, atomically (temporary file, then rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  Image.fromarray(image).save(tmp, format='PNG')
  tmp.replace(path)
  return path

"""Demo source: scikit-learn's bundled handwritten digits.

sklearn.datasets.load_digits returns 1797 real 8x8 scans with 17 gray levels (0..16), copied
from the UCI ML handwritten digits test set and shipped with scikit-learn (BSD-3-Clause), so
nothing is downloaded.
"""

import numpy as np
from PIL import Image
from sklearn import datasets

from opengan_jax.data.labeled_images import LabeledImages


def load_digits(resolution: int) -> LabeledImages:
  """Load the digits as RGB uint8 upsampled to `resolution`; class k is the digit k."""
  digits = datasets.load_digits()
  gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.empty((len(gray), resolution, resolution, 3), np.uint8)
  for i, scan in enumerate(gray):
    upsampled = Image.fromarray(scan).resize((resolution, resolution), Image.Resampling.BICUBIC)
    images[i] = np.asarray(upsampled)[:, :, None]
  return LabeledImages(
    images=images,
    labels=digits.target.astype(np.int32),
    class_names=tuple(str(digit) for digit in range(10)),
  )

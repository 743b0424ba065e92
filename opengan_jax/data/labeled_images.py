"""Decoded images of all classes of a dataset, before the training/novel split."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LabeledImages:
  """All images of a source, labelled 0..K-1 in class order (training classes come first)."""

  images: np.ndarray  # uint8 (N, R, R, 3)
  labels: np.ndarray  # int32 (N,), index into class_names
  class_names: tuple[str, ...]
  skipped_files: tuple[str, ...] = ()  # Files that could not be decoded.

"""Deterministic, resumable batching of in-memory images."""

import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np


def to_float(images: np.ndarray) -> np.ndarray:
  """Map uint8 images to float32 in [-1, 1]."""
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


class BatchSampler:
  """Batches whose content is a pure function of (seed, step), so training resumes exactly.

  Epoch e = step // steps_per_epoch visits the images in the order of a permutation drawn from
  np.random.default_rng([seed, e]). Each step takes the next global_batch_size rows of it, and the
  last incomplete batch of an epoch is dropped. With random_flip, each image is flipped
  horizontally with probability 1/2, drawn from (seed, epoch, step). Each process keeps rows
  [process_index * local, (process_index + 1) * local) of the global batch.
  """

  def __init__(
    self,
    images: np.ndarray,
    labels: np.ndarray,
    global_batch_size: int,
    seed: int,
    random_flip: bool,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_images = len(images)
    if len(labels) != num_images:
      raise ValueError(f'images has {num_images} rows but labels has {len(labels)}')
    if global_batch_size <= 0:
      raise ValueError(f'global batch size {global_batch_size} must be positive')
    if num_images < global_batch_size:
      raise ValueError(
        f'global batch size {global_batch_size} exceeds the number of images ({num_images}): '
        'use a smaller batch size'
      )
    if global_batch_size % process_count:
      raise ValueError(
        f'global batch size {global_batch_size} is not divisible by the process count '
        f'{process_count}: use a multiple of {process_count}'
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f'process index {process_index} is outside [0, {process_count})')
    if seed < 0:
      raise ValueError(f'seed {seed} must be non-negative')

    self.images = images
    self.labels = np.asarray(labels, dtype=np.int32)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.random_flip = random_flip
    self.process_index = process_index
    self.steps_per_epoch = num_images // global_batch_size
    self._cached_epoch = None
    self._cached_permutation = None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._cached_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._cached_permutation = rng.permutation(len(self.images))
      self._cached_epoch = epoch
    return self._cached_permutation

  def global_indices(self, step: int) -> np.ndarray:
    """Return the image rows of the whole global batch of `step`."""
    if step < 0:
      raise ValueError(f'step {step} must be non-negative')
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.global_batch_size
    return self._permutation(epoch)[start : start + self.global_batch_size]

  def global_flips(self, step: int) -> np.ndarray:
    """Return which rows of the global batch of `step` are flipped (bool)."""
    if not self.random_flip:
      return np.zeros(self.global_batch_size, dtype=bool)
    epoch = step // self.steps_per_epoch
    # The trailing 1 keeps this seed sequence distinct from the permutation's [seed, epoch].
    rng = np.random.default_rng([self.seed, epoch, step, 1])
    return rng.random(self.global_batch_size) < 0.5

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Return this process's part of the global batch of `step`.

    Returns dict(image=float32 (local, R, R, 3) in [-1, 1], label=int32 (local,),
    index=int32 (local,)), where index is the row in `images`.
    """
    rows = slice(
      self.process_index * self.local_batch_size, (self.process_index + 1) * self.local_batch_size
    )
    indices = self.global_indices(step)[rows]
    flips = self.global_flips(step)[rows]
    images = self.images[indices]
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return dict(
      image=to_float(images),
      label=self.labels[indices],
      index=indices.astype(np.int32),
    )


def prefetch_batches(
  sampler: BatchSampler, start_step: int, num_steps: int | None = None, buffer_size: int = 2
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yield (step, sampler.batch(step)) from `start_step` on, preparing batches in a thread.

  One background thread fills a queue of at most `buffer_size` batches. It stops when
  `num_steps` batches were made (None: never) or when the generator is closed.
  """
  stop = threading.Event()
  batches: queue.Queue = queue.Queue(maxsize=buffer_size)
  end_step = None if num_steps is None else start_step + num_steps

  def put(item) -> bool:
    """Put `item` in the queue unless the consumer stopped first."""
    while not stop.is_set():
      try:
        batches.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    step = start_step
    while end_step is None or step < end_step:
      try:
        item = (step, sampler.batch(step))
      except Exception as error:  # noqa: BLE001  # Re-raised in the consumer's thread.
        put(error)
        return
      if not put(item):
        return
      step += 1
    put(None)

  thread = threading.Thread(target=produce, name='prefetch_batches', daemon=True)
  thread.start()
  try:
    while True:
      item = batches.get()
      if item is None:
        return
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


def sample_sources(
  images: np.ndarray, labels: np.ndarray, num: int, seed: int
) -> dict[str, np.ndarray]:
  """Select `num` images from distinct classes, deterministically for a given seed.

  Classes are visited in a seeded random order and one random image is taken from each. When
  `num` exceeds the number of classes, later rounds take further images of the same classes.
  Returns dict(image=float32 (num, R, R, 3) in [-1, 1], label=int32 (num,), index=int32 (num,)).
  """
  if not 0 < num <= len(images):
    raise ValueError(f'cannot select {num} source images from {len(images)} images')
  rng = np.random.default_rng([seed, 2])
  classes = rng.permutation(np.unique(labels))
  rows_per_class = [rng.permutation(np.flatnonzero(labels == label)) for label in classes]
  chosen = []
  round_index = 0
  while len(chosen) < num:
    for rows in rows_per_class:
      if round_index < len(rows) and len(chosen) < num:
        chosen.append(rows[round_index])
    round_index += 1
  indices = np.asarray(chosen, dtype=np.int32)
  return dict(
    image=to_float(images[indices]),
    label=np.asarray(labels[indices], dtype=np.int32),
    index=indices,
  )

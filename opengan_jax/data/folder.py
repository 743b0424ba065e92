"""Class-per-folder image source: image_dir/<class name>/<image file>."""

import concurrent.futures
import hashlib
import os
from typing import NamedTuple

import numpy as np
from absl import logging

from opengan_jax.data import decode
from opengan_jax.data.labeled_images import LabeledImages

# Unreadable files named one per log line; the rest are only counted.
MAX_LOGGED_SKIPS = 20


class ClassFolder(NamedTuple):
  name: str
  path: str
  files: list[str]


def check_image_dir(image_dir: str | None, field: str = 'dataset.image_dir') -> str:
  """Return `image_dir` if it is an existing directory; raise ValueError otherwise."""
  if image_dir is None:
    raise ValueError(
      f'{field} is not set: set --config.{field}=/path/to/images, a folder with one '
      'sub-folder of images per class'
    )
  if not os.path.exists(image_dir):
    raise ValueError(f'{field}={image_dir!r} not found: check the path')
  if not os.path.isdir(image_dir):
    raise ValueError(
      f'{field}={image_dir!r} is not a directory: pass a folder with one sub-folder per class'
    )
  return image_dir


def _visible_entries(directory: str) -> list[os.DirEntry]:
  with os.scandir(directory) as entries:
    return sorted((e for e in entries if not e.name.startswith('.')), key=lambda e: e.name)


def list_class_folders(image_dir: str, kind: str = 'class') -> list[ClassFolder]:
  """List the image files for each sub-folder of `image_dir`, in sorted name order.

  Hidden entries (names starting with '.') are ignored, and so are files directly in
  `image_dir` and folders nested inside class folders.
  """
  classes = []
  for entry in _visible_entries(image_dir):
    if not entry.is_dir():
      continue
    files = [f.path for f in _visible_entries(entry.path) if f.is_file()]
    classes.append(ClassFolder(entry.name, entry.path, files))
  if not classes:
    raise ValueError(
      f'{image_dir!r} contains no {kind} sub-folders: put the images of each {kind} in their '
      'own sub-folder'
    )
  return classes


def list_identity_classes(image_dir: str, identity_file: str) -> list[ClassFolder]:
  """Group the images of a flat folder by the identities of a CelebA-style identity file.

  Each line of `identity_file` is "<file name> <identity>" (CelebA's identity_CelebA.txt).
  Identities are ordered by number of images in `image_dir`, most first (ties by identity), so
  the first N classes are the N identities with the most images. Listed files absent from
  `image_dir` are ignored; files in `image_dir` without an identity are logged and ignored.
  """
  if not os.path.isfile(identity_file):
    raise ValueError(
      f'dataset.identity_file={identity_file!r} not found: pass the path of identity_CelebA.txt'
    )
  present = {entry.name for entry in _visible_entries(image_dir) if entry.is_file()}
  files_by_identity: dict[str, list[str]] = {}
  with open(identity_file) as lines:
    for line_number, line in enumerate(lines, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 2:
        raise ValueError(
          f'{identity_file}:{line_number}: expected "<file name> <identity>", got {line.strip()!r}'
        )
      file_name, identity = fields
      if file_name in present:
        present.discard(file_name)
        files_by_identity.setdefault(identity, []).append(os.path.join(image_dir, file_name))
  if present:
    logging.warning(
      'Ignored %d files of %s that %s does not list, e.g. %s',
      len(present),
      image_dir,
      identity_file,
      sorted(present)[0],
    )
  if not files_by_identity:
    raise ValueError(
      f'none of the files in dataset.image_dir={image_dir!r} is listed in '
      f'dataset.identity_file={identity_file!r}: check that both belong to the same dataset'
    )

  def rank(identity: str) -> tuple:
    number = int(identity) if identity.isdigit() else -1
    return (-len(files_by_identity[identity]), number, identity)

  return [
    ClassFolder(identity, image_dir, sorted(files_by_identity[identity]))
    for identity in sorted(files_by_identity, key=rank)
  ]


def fingerprint(class_folders: list[ClassFolder]) -> str:
  """Hash the class names and each file's name, size and modification time."""
  digest = hashlib.sha256()
  for folder in class_folders:
    digest.update(f'class {folder.name}\n'.encode())
    for path in folder.files:
      stat = os.stat(path)
      digest.update(f'{os.path.basename(path)} {stat.st_size} {stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()[:16]


def _decode_or_error(path: str, resolution: int) -> np.ndarray | str:
  try:
    return decode.load_image(path, resolution)
  except decode.DECODE_ERRORS as error:
    return f'{type(error).__name__}: {error}'


def log_skipped(skipped: list[tuple[str, str]]) -> None:
  """Log one warning per unreadable file up to MAX_LOGGED_SKIPS, then the total count."""
  for path, reason in skipped[:MAX_LOGGED_SKIPS]:
    logging.warning('Skipped unreadable image %s (%s)', path, reason)
  if len(skipped) > MAX_LOGGED_SKIPS:
    logging.warning('... and %d more unreadable files', len(skipped) - MAX_LOGGED_SKIPS)
  if skipped:
    logging.warning('Skipped %d unreadable files in total', len(skipped))


def load_folder(
  class_folders: list[ClassFolder], resolution: int, num_threads: int | None = None
) -> LabeledImages:
  """Decode every file of `class_folders` with a thread pool; unreadable files are skipped."""
  paths = [path for folder in class_folders for path in folder.files]
  # Pillow releases the GIL while it decodes and resizes, so threads run in parallel.
  num_threads = num_threads or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
    results = list(pool.map(lambda path: _decode_or_error(path, resolution), paths))

  images, labels, skipped = [], [], []
  position = 0
  for label, folder in enumerate(class_folders):
    num_decoded = 0
    for path in folder.files:
      result = results[position]
      position += 1
      if isinstance(result, str):
        skipped.append((path, result))
        continue
      images.append(result)
      labels.append(label)
      num_decoded += 1
    if num_decoded == 0:
      log_skipped(skipped)
      raise ValueError(
        f'class folder {folder.path!r} contains no readable images ({len(folder.files)} files, '
        'none decoded): add images to it or remove it'
      )
  log_skipped(skipped)
  return LabeledImages(
    images=np.stack(images),
    labels=np.asarray(labels, dtype=np.int32),
    class_names=tuple(folder.name for folder in class_folders),
    skipped_files=tuple(path for path, _ in skipped),
  )

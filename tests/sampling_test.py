"""Tests of sampling.sample_from_workdir and `main.py --mode=sample` on a trained workdir."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_runs
from PIL import Image

from opengan_jax import sampling
from opengan_jax.data import decode

REPO = pathlib.Path(__file__).resolve().parents[1]
GRID_PADDING = 2  # image_grid.make_grid's default padding in pixels.
NOVEL_CLASS = tiny_runs.FLOWER_CLASSES[-1]


@pytest.fixture
def trained(tmp_path_factory, flowers_dir) -> pathlib.Path:
  return tiny_runs.trained_workdir(tmp_path_factory, flowers_dir)


def _grid_side(num_tiles: int) -> int:
  return num_tiles * (tiny_runs.RESOLUTION + GRID_PADDING) + GRID_PADDING


def _tile(grid: np.ndarray, row: int, column: int) -> np.ndarray:
  step = tiny_runs.RESOLUTION + GRID_PADDING
  top, left = GRID_PADDING + row * step, GRID_PADDING + column * step
  return grid[top : top + tiny_runs.RESOLUTION, left : left + tiny_runs.RESOLUTION]


def _novel_files(flowers_dir: pathlib.Path, count: int) -> list[pathlib.Path]:
  files = sorted((flowers_dir / NOVEL_CLASS).glob('*.jpg'))
  return files[tiny_runs.IMAGES_PER_CLASS : tiny_runs.IMAGES_PER_CLASS + count]  # Unseen ones.


def test_sample_grid_from_files_and_folder(trained, flowers_dir, tmp_path):
  files = _novel_files(flowers_dir, 3)
  folder = tmp_path / 'folder_source'
  folder.mkdir()
  (folder / files[2].name).symlink_to(files[2])
  (folder / 'notes.txt').write_text('not an image, and not listed: wrong suffix')
  output = tmp_path / 'out' / 'grid.png'
  num_samples = 3

  written = sampling.sample_from_workdir(
    str(trained), [str(files[0]), str(files[1]), str(folder)], str(output), num_samples
  )

  assert written == output
  with Image.open(output) as image:
    assert image.size == (_grid_side(1 + num_samples), _grid_side(3))
    grid = np.asarray(image.convert('RGB'))
  for row, path in enumerate(files):
    expected = decode.load_image(str(path), tiny_runs.RESOLUTION)
    np.testing.assert_array_equal(_tile(grid, row, 0), expected)
  samples = [_tile(grid, 0, column) for column in range(1, 1 + num_samples)]
  assert not np.array_equal(samples[0], samples[1]), 'two latents gave the same image'


def test_sample_is_deterministic_for_a_seed(trained, flowers_dir, tmp_path):
  sources = [str(p) for p in _novel_files(flowers_dir, 1)]
  first = sampling.sample_from_workdir(str(trained), sources, str(tmp_path / 'a.png'), 2, seed=5)
  second = sampling.sample_from_workdir(str(trained), sources, str(tmp_path / 'b.png'), 2, seed=5)
  with Image.open(first) as a, Image.open(second) as b:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unreadable_source_rejected(trained, flowers_dir, tmp_path):
  fake = tmp_path / 'fake.jpg'
  fake.write_text('this is text, not a JPEG')
  output = tmp_path / 'grid.png'
  sources = [str(_novel_files(flowers_dir, 1)[0]), str(fake)]

  with pytest.raises(ValueError, match='fake.jpg is not a readable image'):
    sampling.sample_from_workdir(str(trained), sources, str(output))

  assert not output.exists()


def test_missing_source_rejected(trained, tmp_path):
  output = tmp_path / 'grid.png'
  with pytest.raises(FileNotFoundError, match='missing.jpg does not exist'):
    sampling.sample_from_workdir(str(trained), [str(tmp_path / 'missing.jpg')], str(output))
  assert not output.exists()


def test_empty_source_folder_rejected(trained, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match='contains no image files'):
    sampling.sample_from_workdir(str(trained), [str(empty)], str(tmp_path / 'grid.png'))


def test_workdir_without_config_rejected(tmp_path, flowers_dir):
  source = str(_novel_files(flowers_dir, 1)[0])
  with pytest.raises(FileNotFoundError, match='config.json not found'):
    sampling.sample_from_workdir(str(tmp_path), [source], str(tmp_path / 'grid.png'))


def test_workdir_without_checkpoint_rejected(trained, flowers_dir, tmp_path):
  workdir = tmp_path / 'untrained'
  workdir.mkdir()
  shutil.copy(trained / 'config.json', workdir)
  source = str(_novel_files(flowers_dir, 1)[0])

  with pytest.raises(FileNotFoundError, match='no extractor checkpoint in .*untrained'):
    sampling.sample_from_workdir(str(workdir), [source], str(tmp_path / 'grid.png'))

  shutil.copytree(
    trained / 'checkpoints' / 'extractor',
    workdir / 'checkpoints' / 'extractor',
    dirs_exist_ok=True,
  )
  with pytest.raises(FileNotFoundError, match='no GAN checkpoint in .*untrained'):
    sampling.sample_from_workdir(str(workdir), [source], str(tmp_path / 'grid.png'))


def test_main_sample_mode_writes_png(trained, flowers_dir, tmp_path):
  sources = ','.join(str(p) for p in _novel_files(flowers_dir, 2))
  output = tmp_path / 'cli.png'
  # One device, while the workdir was trained on the 4 test devices: sampling must not depend on
  # the device count of training.
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  command = [
    sys.executable,
    'main.py',
    '--mode=sample',
    f'--workdir={trained}',
    f'--sources={sources}',
    f'--output={output}',
    '--num_samples=2',
  ]

  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

  assert result.returncode == 0, result.stderr[-3000:]
  with Image.open(output) as image:
    assert image.size == (_grid_side(3), _grid_side(2))

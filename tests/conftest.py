"""Shared test fixtures.

Tests run on the CPU with 4 faked devices, so the data-parallel path is covered on any machine.
"""

import os
import pathlib
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The tests run with the XLA:CPU options of the entry points (see opengan_jax/cpu_backend.py).
from opengan_jax import cpu_backend  # noqa: E402

cpu_backend.add_xla_cpu_flags()

# Several tests compile the same training steps; a per-session compilation cache pays for each
# program once.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='opengan-jax-test-compile-cache-')
)

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'


def _require_shared(subdir: str) -> pathlib.Path:
  path = SHARED_DATA / subdir
  if path.is_dir():
    return path
  reason = (
    f'real images not found at {path}: place the shared data folder beside the repository '
    '(../shared/data) to run this test'
  )
  if os.environ.get('CI') == 'true':
    pytest.fail(reason + '; CI requires it')
  pytest.skip(reason)


@pytest.fixture(scope='session')
def flowers_dir() -> pathlib.Path:
  """Root of the Flowers102 class-per-folder copy (folders 001-102)."""
  return _require_shared('flowers102')


@pytest.fixture(scope='session')
def faces_dir() -> pathlib.Path:
  """Root of the CelebA face crops, one folder per identity."""
  return _require_shared('faces')

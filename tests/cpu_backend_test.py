"""Tests for the XLA:CPU options that the entry points set before JAX starts."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from opengan_jax import cpu_backend

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Prints the optimised HLO of one convolution that YNNPACK takes by default.
CONV_HLO_SCRIPT = """
import jax, jax.numpy as jnp
from jax import lax
conv = jax.jit(lambda x, w: lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
print(conv.lower(jnp.zeros((8, 16, 16, 32)), jnp.zeros((3, 3, 32, 32))).compile().as_text())
"""


def _conv_hlo() -> str:
  conv = jax.jit(
    lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
  )
  return conv.lower(jnp.zeros((8, 16, 16, 32)), jnp.zeros((3, 3, 32, 32))).compile().as_text()


def test_flags_added_to_empty_environment():
  environ = {}
  added = cpu_backend.add_xla_cpu_flags(environ)
  assert added == list(cpu_backend.XLA_CPU_FLAGS)
  assert environ['XLA_FLAGS'].split() == list(cpu_backend.XLA_CPU_FLAGS)


def test_user_flags_keep_their_values():
  user_value = '--xla_cpu_use_fusion_emitters=true'
  environ = {'XLA_FLAGS': f'--xla_force_host_platform_device_count=4 {user_value}'}
  added = cpu_backend.add_xla_cpu_flags(environ)
  flags = environ['XLA_FLAGS'].split()
  assert flags[:2] == ['--xla_force_host_platform_device_count=4', user_value]
  assert '--xla_cpu_use_fusion_emitters=false' not in flags
  assert len(added) == len(cpu_backend.XLA_CPU_FLAGS) - 1
  # A second call adds nothing more.
  assert cpu_backend.add_xla_cpu_flags(environ) == []
  assert environ['XLA_FLAGS'].split() == flags


def test_opt_out_leaves_xla_flags_alone():
  environ = {cpu_backend.OPT_OUT_VARIABLE: '0', 'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  assert cpu_backend.add_xla_cpu_flags(environ) == []
  assert environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/x'


def test_process_compiles_conv_without_ynnpack():
  # conftest.py applied the flags before JAX started, as the entry points do.
  for flag in cpu_backend.XLA_CPU_FLAGS:
    assert flag in os.environ['XLA_FLAGS'].split()
  hlo = _conv_hlo()
  assert 'convolution(' in hlo
  assert '__ynn_fusion' not in hlo


def test_default_flags_send_conv_to_ynnpack():
  # Shows that the check above can fail: JAX's default puts this convolution in a YNNPACK fusion.
  environ = {
    key: value for key, value in os.environ.items() if key not in ('XLA_FLAGS', 'PYTHONPATH')
  }
  environ[cpu_backend.OPT_OUT_VARIABLE] = '0'
  result = subprocess.run(
    [sys.executable, '-c', CONV_HLO_SCRIPT],
    capture_output=True,
    text=True,
    env=environ,
    cwd=REPO_ROOT,
    timeout=300,
    check=True,
  )
  assert '__ynn_fusion' in result.stdout


def test_flags_keep_convolution_results():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 32))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 16)) * 0.1
  got = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  # A direct sum over the 3x3 taps in float64 numpy.
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  wn = np.asarray(w, np.float64)
  want = sum(
    np.einsum('bhwc,co->bhwo', xp[:, i : i + 16, j : j + 16], wn[i, j])
    for i in range(3)
    for j in range(3)
  )
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)

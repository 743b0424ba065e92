"""XLA:CPU options that make the GAN iteration faster and smaller on the CPU.

XLA reads `XLA_FLAGS` once, when JAX starts its first backend, so `add_xla_cpu_flags` must run
before the first JAX computation. The entry points (main.py, the evaluation, generation and
benchmark scripts, and the tests) call it first thing. This module does not import JAX.

Each option was chosen by measurement on a 2-core Xeon with jax 0.10.2 (BENCHMARKS.md has the
figures and commands). At R=32, ch=32 and batch 32, the three options together took the
iteration from 26.3 to 34.0 images/s and its peak memory from 1580 MB to 844 MB. The options
name the CPU backend only, so GPU and TPU programs ignore them.
"""

import os
from collections.abc import MutableMapping

# Set OPENGAN_XLA_CPU_FLAGS=0 to leave XLA_FLAGS exactly as the environment has it.
OPT_OUT_VARIABLE = 'OPENGAN_XLA_CPU_FLAGS'

XLA_CPU_FLAGS = (
  # jax 0.10 sends convolutions to YNNPACK by default. YNNPACK ran the iteration's
  # weight-gradient convs at 37-60 GFLOP/s, and Eigen ran the same shapes at 94-150 GFLOP/s.
  # Dots stay with YNNPACK, which is faster than Eigen for them.
  '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
  # The newer fusion emitters needed about 690 MB of extra host memory to compile the
  # iteration, against about 150 MB with the classic ones. The step ran 0-5% slower.
  '--xla_cpu_use_fusion_emitters=false',
  # The concurrency-optimised scheduler keeps more buffers alive so that independent ops can
  # run side by side. With 2 cores each convolution already uses both, and turning it off made
  # the iteration smaller and no slower.
  # NOTE: measured on 2 cores only. On a many-core CPU the scheduler may pay off; setting this
  # flag to true in XLA_FLAGS overrides the default here.
  '--xla_cpu_enable_concurrency_optimized_scheduler=false',
)


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0]


def add_xla_cpu_flags(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """Append the flags of XLA_CPU_FLAGS to XLA_FLAGS in `environ` (default os.environ).

  A flag that XLA_FLAGS already sets, to any value, is left as it is, so a user's own choice
  wins. Nothing changes when OPENGAN_XLA_CPU_FLAGS is '0'. Returns the flags it added.
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT_VARIABLE, '1') == '0':
    return []
  current = environ.get('XLA_FLAGS', '').split()
  present = {_flag_name(flag) for flag in current}
  added = [flag for flag in XLA_CPU_FLAGS if _flag_name(flag) not in present]
  if added:
    environ['XLA_FLAGS'] = ' '.join(current + added)
  return added
